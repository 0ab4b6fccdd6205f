"""Where the host time of a training step goes: the Python functions of one timm model's AdamW step
under cProfile, per step.

A training step whose kernels are short is bound by the host: the Python of the layers and the
operator calls (argument parsing, dispatch, allocation, the launch) that queue the kernels. The
device profile (profile_vmamba.py) says how busy the device is; this says which functions the host
spends the step in. For each model: the step's wall time without the profiler (CUDA events, median;
the queue drained before each step as in bench_models.py), then cProfile over ``--steps`` steps:
the top functions by own time (us per step, calls per step) and the ones with the most calls.
cProfile adds a fixed cost per Python call, so Python-heavy functions read high; compare runs of
this script with each other, not with the wall time.

    python benchmarks/profile_step_host.py --out DIR [--models vmamba_tiny,...] [--batch 64]
        [--layout cf|cl] [--steps 10] [--top 40]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import set_backends, training_step  # noqa: E402
from harness import header, time_ms, write_report  # noqa: E402

import ssm2d_vision  # noqa: E402,F401  (registers the project's models; before timm)
import timm  # noqa: E402


def _where(func: tuple) -> str:
    path, line, name = func
    if path == "~":
        return name  # a built-in
    short = path.split("site-packages/")[-1].split("/src/")[-1]
    return f"{short}:{line}({name})"


def host_table(stats: pstats.Stats, steps: int, top: int, key: str) -> list[str]:
    rows = []
    for func, (cc, nc, tt, ct, _) in stats.stats.items():
        rows.append((func, nc / steps, tt * 1e6 / steps, ct * 1e6 / steps))
    total = sum(r[2] for r in rows)
    rows.sort(key=(lambda r: -r[2]) if key == "own" else (lambda r: -r[1]))
    lines = [f"| function | calls / step | own us / step | share of own | cumulative us / step |", "|---|---|---|---|---|"]
    for func, calls, own, cum in rows[:top]:
        lines.append(f"| `{_where(func)}` | {calls:,.0f} | {own:,.0f} | {100 * own / total:.1f}% | {cum:,.0f} |")
    return lines


def profile_model(name: str, args) -> list[str]:
    cl = args.layout == "cl"
    model = timm.create_model(name, num_classes=1000).to(args.device)
    model = model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
    step, inputs = training_step(model, args.batch, args.device, cl, args.image)
    wall = time_ms(step, inputs, args.device, warmup=3, reps=args.reps)
    prof = cProfile.Profile()
    if args.device == "cuda":
        torch.cuda.synchronize()
    prof.enable()
    for i in range(args.steps):
        step(inputs[i % len(inputs)])
    if args.device == "cuda":
        torch.cuda.synchronize()
    prof.disable()
    stats = pstats.Stats(prof)
    calls = sum(s[1] for s in stats.stats.values()) / args.steps
    own = sum(s[2] for s in stats.stats.values()) * 1e3 / args.steps
    out = [f"## {name} ({args.layout}, batch {args.batch})", "",
           f"Wall time per step without the profiler: {wall:.2f} ms ({args.batch / wall * 1e3:,.0f} img/s, median "
           f"of {args.reps}). Under cProfile: {own:.1f} ms of host time per step in {calls:,.0f} Python-level "
           "calls.", "", "Top functions by own time:", ""]
    out += host_table(stats, args.steps, args.top, "own")
    out += ["", "Most called:", ""]
    out += host_table(stats, args.steps, 15, "calls")
    out += ["", "Operators by host (self CPU) time, torch.profiler (CPU activity only; the backward's "
            "operators run here, which cProfile sees only as run_backward):", ""]
    out += operator_table(step, inputs, args)
    return out + [""]


def operator_table(step, inputs, args) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    if args.device == "cuda":
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(args.steps):
            step(inputs[i % len(inputs)])
        if args.device == "cuda":
            torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    lines = ["| operator | calls / step | self us / step | share |", "|---|---|---|---|"]
    for e in events[:args.top]:
        lines.append(f"| `{e.key}` | {e.count / args.steps:,.0f} | {e.self_cpu_time_total / args.steps:,.0f} | "
                     f"{100 * e.self_cpu_time_total / total:.1f}% |")
    lines.append(f"| all | {sum(e.count for e in events) / args.steps:,.0f} | {total / args.steps:,.0f} | |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="vmamba_tiny")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--image", type=int, default=224)
    ap.add_argument("--layout", choices=("cf", "cl"), default="cf")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.steps < 1 or args.reps < 1 or args.batch < 1:
        ap.error("--steps, --reps and --batch must be >= 1")
    set_backends(args.device)
    lines = ["# Host time of a training step (cProfile)", "", header(args.device), "",
             f"{args.image}x{args.image}, bf16 autocast, AdamW; {args.steps} profiled steps.", ""]
    for name in [m for m in args.models.split(",") if m]:
        lines += profile_model(name, args)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    write_report(args.out, "profile_step_host", lines, [{"models": args.models, "layout": args.layout,
                                                         "batch": args.batch}])
    return 0


if __name__ == "__main__":
    sys.exit(main())
