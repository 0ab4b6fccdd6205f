"""tools/ab_summary.py: medians and ratios of a same-machine A/B run, from random synthetic tables."""

from __future__ import annotations

import importlib.util
import json
import random
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _module():
    spec = importlib.util.spec_from_file_location("ab_summary", ROOT / "tools" / "ab_summary.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _models_md(rows: dict) -> str:
    lines = ["device: test", "", "| model | params | infer b128 img/s | train b64 img/s |", "|---|---|---|---|"]
    for model, (inf, trn) in rows.items():
        lines.append(f"| {model} | 1,000 | {inf:,.0f} (1.4 GiB) [cl] | {trn:,.0f} (4.3 GiB) |")
    return "\n".join(lines) + "\n"


def test_medians_and_ratios_over_rounds(tmp_path):
    ab = _module()
    rng = random.Random()
    names, rounds = ["aaaa111", "bbbb222"], 3
    expect = {}
    for name in names:
        runs = []
        for r in range(1, rounds + 1):
            rows = {m: (float(rng.randint(1000, 9000)), float(rng.randint(100, 2000)))
                    for m in ("convnext_tiny", "vmamba_tiny")}
            runs.append(rows)
            (tmp_path / f"ab_models_{name}_r{r}.md").write_text(_models_md(rows))
            d = tmp_path / f"ab_overhead_{name}_r{r}"
            d.mkdir()
            us = [rng.uniform(10, 900) for _ in range(3)]
            (d / "op_overhead.json").write_text(json.dumps(
                [{"op": "scan2d", "case": "c1", "fwd_nograd": us[0], "fwd_grad": us[1], "fwd_bwd": us[2]},
                 {"op": "add_", "floor_us": 10.0}]))
            expect.setdefault(name, {}).setdefault("us", []).append(us)
        expect[name]["runs"] = runs
    text = ab.summarize(tmp_path, names)
    row = next(line for line in text.splitlines() if line.startswith("| vmamba_tiny |"))
    for name in names:
        runs = expect[name]["runs"]
        inf = statistics.median(r["vmamba_tiny"][0] for r in runs)
        ratio = statistics.median(r["vmamba_tiny"][1] / r["convnext_tiny"][1] for r in runs)
        assert f"{inf:,.0f} (" in row
        assert f"({ratio:.3f}x)" in row
        fwd_bwd = statistics.median(u[2] for u in expect[name]["us"])
        assert f"{fwd_bwd:,.1f}" in next(line for line in text.splitlines() if line.startswith("| scan2d | c1 |"))
    assert f"rounds: {names[0]} {rounds}, {names[1]} {rounds}" in text


def test_a_failed_cell_is_left_out_not_read_as_zero():
    ab = _module()
    assert ab.img_per_s("failed: CUDA out of memory") is None
    assert ab.img_per_s("4,479 (1.4 GiB) [cl]") == 4479.0
    assert ab.median([None, 3.0, 5.0]) == 4.0


def test_one_tree_repeated(tmp_path, capsys):
    # tools/gpu_check.sh models with MODEL_REPEATS: repeated runs of one tree, summarized by name.
    ab = _module()
    rng = random.Random()
    runs = []
    for r in range(1, 4):
        rows = {m: (float(rng.randint(1000, 9000)), float(rng.randint(100, 2000))) for m in ("convnext_tiny", "m2d_tiny")}
        runs.append(rows)
        (tmp_path / f"ab_models_abc1234_r{r}.md").write_text(_models_md(rows))
    assert ab.main([str(tmp_path), "abc1234"]) == 0
    text = capsys.readouterr().out
    row = next(line for line in text.splitlines() if line.startswith("| m2d_tiny |"))
    ratio = statistics.median(r["m2d_tiny"][1] / r["convnext_tiny"][1] for r in runs)
    assert f"{statistics.median(r['m2d_tiny'][0] for r in runs):,.0f} (" in row and f"({ratio:.3f}x)" in row
    assert "rounds: abc1234 3" in text
