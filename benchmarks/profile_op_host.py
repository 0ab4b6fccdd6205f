"""Where the host time of one op call goes: Python functions (cProfile) and CUDA runtime calls
(torch.profiler's CPU-side trace of the runtime API), over many calls at the bench_op_overhead shapes.

    python benchmarks/profile_op_host.py [--case route|2d|wave] [--mode nograd|grad|fwdbwd] [--calls 500]

Prints the top functions by own time per call (us) and the runtime API calls per op call with their
host us. Like bench_op_overhead.py, the device queue is drained before each call, so the kernels'
own time does not enter (only what the host waits for inside the call).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_op_overhead import scan2d_inputs, wavefront2d_inputs  # noqa: E402

from ssm2d_nn.ops import scan2d, wavefront2d  # noqa: E402

SHAPES = {"cuda": {"route": (64, 384, 1, 3136), "2d": (64, 384, 56, 56), "wave": (64, 56, 56, 128)},
          "cpu": {"route": (1, 8, 1, 16), "2d": (1, 8, 4, 4), "wave": (1, 4, 4, 8)}}


def make_call(case: str, mode: str, device: str):
    shape = SHAPES[device][case]
    grad = mode != "nograd"
    if case == "wave":
        args = wavefront2d_inputs(shape, 16 if device == "cuda" else 2, device, torch.bfloat16, requires_grad=grad)
        op = wavefront2d
    else:
        args = scan2d_inputs(shape, device, torch.bfloat16, requires_grad=grad)
        op = scan2d
    leaves = [t for t in args.values() if isinstance(t, torch.Tensor) and t.requires_grad]

    def call():
        if mode == "nograd":
            with torch.no_grad():
                op(**args)
        elif mode == "grad":
            op(**args)
        else:
            out = op(**args)
            torch.autograd.backward(out, out.detach())
            for t in leaves:
                t.grad = None
    return call


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="route", choices=["route", "2d", "wave"])
    ap.add_argument("--mode", default="nograd", choices=["nograd", "grad", "fwdbwd"])
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    call = make_call(args.case, args.mode, args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    for _ in range(20):
        call()
    sync()
    print(f"# {args.case} {args.mode} on {args.device}: {args.calls} calls")
    pr = cProfile.Profile()
    for _ in range(args.calls):
        sync()
        pr.enable()
        call()
        pr.disable()
    s = io.StringIO()
    st = pstats.Stats(pr, stream=s)
    st.sort_stats("tottime")
    print("## cProfile, own time per call (us), top 20")
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:20]
    for (file, line, fn), (cc, nc, tt, ct, _) in rows:
        print(f"{tt / args.calls * 1e6:9.2f} own {ct / args.calls * 1e6:9.2f} cum  {nc / args.calls:5.1f}x  "
              f"{Path(file).name}:{line} {fn}")
    if args.device != "cuda":
        return 0
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.calls):
            sync()
            call()
        sync()
    print("## torch.profiler, host side per call (us): self CPU time, calls per op call")
    ka = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:25]
    for e in ka:
        print(f"{e.self_cpu_time_total / args.calls:9.2f} self {e.cpu_time_total / args.calls:9.2f} total "
              f"{e.count / args.calls:5.1f}x  {e.key[:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
