"""Where scan2d's time goes: device time per kernel (torch.profiler) next to the wall time per call.

    python benchmarks/profile_scan2d.py            # the benchmark's cases
    ncu --kernel-name regex:scan2d --launch-count 2 python benchmarks/profile_scan2d.py --once
    python benchmarks/profile_scan2d.py --inference  # the forward alone, nothing saved (no_grad)
    python benchmarks/profile_scan2d.py --dtype bfloat16 --cases 5
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scan2d import CASES, DTYPES, make  # noqa: E402

from ssm2d_nn.ops import scan2d  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--once", action="store_true", help="one call per case (for ncu)")
    ap.add_argument("--cases", default="0,3")
    ap.add_argument("--inference", action="store_true", help="the forward under no_grad instead of fwd+bwd")
    ap.add_argument("--dtype", default="float32", choices=DTYPES,
                    help="u, delta, z, B, C (A, D, delta_bias stay float32)")
    args = ap.parse_args()
    dtype = DTYPES[args.dtype]
    what = "forward (no_grad)" if args.inference else "fwd+bwd"
    for idx in map(int, args.cases.split(",")):
        name, shape, *_ = CASES[idx]
        t = make(shape, dtype)
        gout = torch.randn_like(t["u"])
        if args.inference:
            def step():
                with torch.no_grad():
                    return scan2d(**t, delta_softplus=True, backend="kernel")
        else:
            def step():
                return torch.autograd.grad(scan2d(**t, delta_softplus=True, backend="kernel"), list(t.values()), gout)
        step()
        torch.cuda.synchronize()
        if args.once:
            continue
        t0 = time.perf_counter()
        for _ in range(10):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / 10 * 1e3
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                step()
            torch.cuda.synchronize()
        print(f"== {name} {shape} {args.dtype}: wall {wall:.3f} ms per {what}")
        for ev in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:8]:
            print(f"   {ev.device_time_total / 10 / 1e3:8.3f} ms/step  {ev.count // 10:3d}x  {ev.key[:90]}")


if __name__ == "__main__":
    main()
