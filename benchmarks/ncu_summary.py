"""A short Nsight Compute summary per kernel: duration, occupancy, SM and DRAM throughput, top stalls.

    python benchmarks/ncu_summary.py --label "MIL 128x128" -- python benchmarks/profile_scan2d.py --once --cases 0

Runs ``ncu`` (clocks left alone) on the command after ``--`` for kernels matching ``--kernels``
and prints one Markdown row per launch.
"""

from __future__ import annotations

import argparse
import csv
import io
import subprocess
import sys

STALLS = ("long_scoreboard", "short_scoreboard", "barrier", "wait", "math_pipe_throttle", "mio_throttle",
          "lg_throttle", "not_selected", "no_instruction", "dispatch_stall", "branch_resolving", "membar",
          "drain", "selected", "tex_throttle", "imc_miss", "sleeping")
METRICS = {
    "dur_us": "gpu__time_duration.sum",
    "occ": "sm__warps_active.avg.pct_of_peak_sustained_active",
    "sm": "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "dram": "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "issue": "sm__inst_issued.avg.pct_of_peak_sustained_active",
    "regs": "launch__registers_per_thread",
    "inst": "smsp__inst_executed.sum",
}
STALL_METRIC = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernels", default="regex:scan2d")
    ap.add_argument("--count", type=int, default=8)
    ap.add_argument("--label", default="")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    metrics = list(METRICS.values()) + [STALL_METRIC.format(s) for s in STALLS]
    run = subprocess.run(["ncu", "--clock-control", "none", "-k", args.kernels, "-c", str(args.count), "--csv",
                          "--page", "raw", "--print-units", "base", "--metrics", ",".join(metrics), *cmd],
                         capture_output=True, text=True)
    text = run.stdout[run.stdout.find('"ID"'):] if '"ID"' in run.stdout else ""
    if not text:
        print(run.stdout[-3000:], run.stderr[-3000:], file=sys.stderr)
        return 1
    rows = list(csv.DictReader(io.StringIO(text)))
    print(f"| case | kernel | grid x block | dur us | ach. occ % | SM thr % | DRAM thr % | issue active % | regs "
          "| inst (M) | top stalls (cycles per issued instr) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows[1:] if rows and not r_is_data(rows[0]) else rows:
        name = r.get("Kernel Name", "")[:60]
        grid = f"{r.get('Grid Size', '')} x {r.get('Block Size', '')}"
        stalls = sorted(((num(r.get(STALL_METRIC.format(s), 0)), s) for s in STALLS), reverse=True)[:3]
        f = lambda k: num(r.get(METRICS[k], 0))  # noqa: E731
        print(f"| {args.label} | {name} | {grid} | {f('dur_us') / 1e3:.1f} | {f('occ'):.1f} | {f('sm'):.1f} "
              f"| {f('dram'):.1f} | {f('issue'):.1f} | {f('regs'):.0f} | {f('inst') / 1e6:.1f} | "
              + ", ".join(f"{n} {v:.1f}" for v, n in stalls) + " |")
    return 0


def num(v) -> float:
    """ncu's CSV numbers may carry thousands separators."""
    try:
        return float(str(v).replace(",", "")) if v not in (None, "") else 0.0
    except ValueError:
        return 0.0


def r_is_data(row: dict) -> bool:
    """ncu's raw CSV has a units row after the header; data rows carry a numeric ID."""
    return str(row.get("ID", "")).isdigit()


if __name__ == "__main__":
    sys.exit(main())
