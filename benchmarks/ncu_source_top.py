"""Where a kernel's warps stall, per SASS instruction: read Nsight Compute's source page as CSV.

    ncu --set full -k regex:KERNEL -c 1 -o rep python3 ...        (on the GPU machine)
    ncu -i rep.ncu-rep --page source --csv --print-source sass > src.csv
    python3 benchmarks/ncu_source_top.py src.csv[.gz] [--top 25] [--context 2]

Prints the total of the warp-state samples, the sample columns summed over the kernel (the stall
reasons, largest first), and the instructions holding the most samples with the instructions just
before them (a stall is charged to the instruction that waits, and the reason usually sits a few
instructions earlier: the load it waits for, the barrier it waits at). Needs no GPU; reads any
column layout the source page has (the names differ between Nsight Compute versions).
"""
from __future__ import annotations

import argparse
import csv
import gzip
import sys
from pathlib import Path


def number(text: str) -> float | None:
    text = text.strip().replace(",", "")
    if not text:
        return 0.0
    try:
        return float(text)
    except ValueError:
        return None


def read_page(path: Path) -> tuple[list[str], list[list[str]]]:
    """The header and rows of the source page's CSV (lines before the header are dropped)."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    lines = raw.decode(errors="replace").splitlines()
    start = next((i for i, line in enumerate(lines) if "Source" in line and "," in line), None)
    if start is None:
        raise SystemExit(f"{path}: no header with a 'Source' column; is it `--page source --csv` output?")
    rows = list(csv.reader(lines[start:]))
    return rows[0], [r for r in rows[1:] if len(r) == len(rows[0])]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", type=Path)
    ap.add_argument("--top", type=int, default=25, help="instructions to list (default 25)")
    ap.add_argument("--context", type=int, default=2, help="instructions shown before each (default 2)")
    args = ap.parse_args(argv)
    if not args.csv.is_file():
        raise SystemExit(f"csv: no such file: {args.csv}")
    header, rows = read_page(args.csv)
    src = header.index("Source")
    # Sample columns: numeric in every row, named after sampling or stalls.
    cols = [i for i, name in enumerate(header)
            if ("Sampl" in name or "stall" in name.lower()) and all(number(r[i]) is not None for r in rows)]
    if not cols:
        raise SystemExit(f"{args.csv}: no sampling columns among {header}")
    total_col = next((i for i in cols if "All Samples" in header[i]), cols[0])
    # The stall reasons (all samples), where the page names them; else every other sample column.
    reasons = [i for i in cols if header[i].startswith("stall_") and "Not Issued" not in header[i]]
    cols = reasons or [i for i in cols if i != total_col]
    samples = [number(r[total_col]) or 0.0 for r in rows]
    total = sum(samples)
    print(f"{args.csv.name}: {len(rows)} instructions, {total:.0f} samples in '{header[total_col]}'")
    sums = sorted(((sum(number(r[i]) or 0.0 for r in rows), header[i]) for i in cols if i != total_col), reverse=True)
    print("\nsample columns over the kernel:")
    for s, name in sums[:16]:
        if s > 0:
            print(f"  {100 * s / max(total, 1):6.1f}%  {name}")
    print(f"\ntop {args.top} instructions (share of all samples; the {args.context} before each in brackets):")
    order = sorted(range(len(rows)), key=lambda k: -samples[k])[: args.top]
    for k in sorted(order):
        for c in range(max(0, k - args.context), k):
            print(f"  [{c:5d}]        {rows[c][src].strip()}")
        top_reasons = sorted(((number(rows[k][i]) or 0.0, header[i]) for i in cols if i != total_col), reverse=True)[:2]
        why = ", ".join(f"{name} {v:.0f}" for v, name in top_reasons if v > 0)
        print(f"  {k:6d} {100 * samples[k] / max(total, 1):5.1f}%  {rows[k][src].strip()}   <- {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
