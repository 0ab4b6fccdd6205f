#!/usr/bin/env python3
"""Medians of a tools/gpu_ab.sh run: per tree, bench_models' img/s (and the ratio to convnext_tiny of
the same run) and bench_op_overhead's host microseconds per call, over the rounds.

    python3 tools/ab_summary.py OUT_DIR NAME [NAME ...]

Reads OUT_DIR/ab_models_NAME_rK.md and OUT_DIR/ab_overhead_NAME_rK/op_overhead.json; prints Markdown.
One NAME summarizes repeated runs of one tree (tools/gpu_check.sh models with MODEL_REPEATS).
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

BASELINE = "convnext_tiny"
_NUMBER = re.compile(r"^\s*([\d,]+(?:\.\d+)?)")


def img_per_s(cell: str) -> float | None:
    """'4,479 (1.4 GiB) [cl]' -> 4479.0; None for a cell without a leading number ('failed', '-')."""
    m = _NUMBER.match(cell)
    return float(m.group(1).replace(",", "")) if m else None


def models_table(path: Path) -> dict[str, tuple[float | None, float | None]]:
    """{model: (inference img/s, training img/s)} from a bench_models.py Markdown table."""
    rows = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[0] and not cells[0].startswith(("model", "---")):
            rows[cells[0]] = (img_per_s(cells[-2]), img_per_s(cells[-1]))
    return rows


def median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v: float | None, digits: int = 0) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def summarize(out: Path, names: list[str]) -> str:
    lines = [f"# A/B on one machine: {' vs '.join(names)} (medians over rounds)", ""]
    per_tree, rounds = {}, {}
    for name in names:
        runs = [models_table(p) for p in sorted(out.glob(f"ab_models_{name}_r*.md"))]
        rounds[name] = len(runs)
        stats = {}
        for model in sorted({m for r in runs for m in r}):
            inf = [r[model][0] for r in runs if model in r]
            trn = [r[model][1] for r in runs if model in r]
            base = [r.get(BASELINE, (None, None)) for r in runs if model in r]
            rinf = [a / b[0] if a and b[0] else None for a, b in zip(inf, base)]
            rtrn = [a / b[1] if a and b[1] else None for a, b in zip(trn, base)]
            stats[model] = (median(inf), median(rinf), median(trn), median(rtrn))
        per_tree[name] = stats
    models = sorted({m for s in per_tree.values() for m in s})
    head = "| model | " + " | ".join(f"{n} infer b128 img/s (ratio) | {n} train b64 img/s (ratio)" for n in names) + " |"
    lines += [head, "|---|" + "---|" * (2 * len(names))]
    for m in models:
        cells = []
        for n in names:
            s = per_tree[n].get(m)
            cells += ["-", "-"] if s is None else [f"{fmt(s[0])} ({fmt(s[1], 3)}x)", f"{fmt(s[2])} ({fmt(s[3], 3)}x)"]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "rounds: " + ", ".join(f"{n} {rounds[n]}" for n in names), ""]
    overhead = {}
    for name in names:
        for path in sorted(out.glob(f"ab_overhead_{name}_r*/op_overhead.json")):
            for row in json.loads(path.read_text()):
                if "case" in row:
                    key = (row["op"], row["case"])
                    for field in ("fwd_nograd", "fwd_grad", "fwd_bwd"):
                        overhead.setdefault(key, {}).setdefault((name, field), []).append(row[field])
    if overhead:
        lines += ["| op | case | " + " | ".join(f"{n} fwd / fwd grad / fwd+bwd us" for n in names) + " |",
                  "|---|---|" + "---|" * len(names)]
        for (op, case), vals in overhead.items():
            cells = [" / ".join(fmt(median(vals.get((n, f), [])), 1) for f in ("fwd_nograd", "fwd_grad", "fwd_bwd"))
                     for n in names]
            lines.append(f"| {op} | {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[0])
    if not out.is_dir():
        print(f"not a directory: {out}", file=sys.stderr)
        return 2
    print(summarize(out, argv[1:]), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
