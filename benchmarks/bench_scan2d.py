"""scan2d on the GPU at the shapes of the spec's anchors, next to the authors' kernel measured on an H200.

    python benchmarks/bench_scan2d.py [--out DIR] [--cases 0,2] [--fwd-only] [--no-reference] [--dtype bfloat16]

Forward and forward+backward medians (CUDA events, warm, inputs rotated among 3 fresh random sets),
the authors' figures (2DMamba's SelectiveScanFn, measured on one NVIDIA H200 side by side with
ssm2d 139592e: the spec's ANCHORS.md, first table) and the ratio authors / ours, the forward's
memory-traffic floor (bytes it must move / measured copy bandwidth) and the share of it reached, and
the peak memory of forward+backward BEYOND the inputs, each case measured alone (nothing of an
earlier case alive), next to the authors' beyond-inputs figure. ``--dtype bfloat16`` (or float16)
runs the cases with u, delta, z, B, C in that dtype (A, D, delta_bias stay float32); the authors'
figures are float32 ones and are then not shown.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (authors_line, authors_table, beside_authors, copy_bandwidth_gbs, gpu_time_ms, header, peak_mib,  # noqa: E402
                     write_report)

from ssm2d_nn.ops import scan2d  # noqa: E402

AUTHORS_DEVICE = "NVIDIA H200"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# name, (batch, D, N, G, H, W), authors' fwd ms, fwd+bwd ms, peak beyond inputs MiB (ANCHORS.md, H200,
# fp32 with softplus, delta_bias, D and the gate z)
CASES = [
    ("MIL 128x128", (1, 256, 16, 1, 128, 128), 0.798, 3.14, 130),
    ("MIL 200x200", (1, 256, 16, 1, 200, 200), 2.322, 9.13, 353),
    ("MIL 489x415", (1, 256, 16, 1, 489, 415), 10.118, 46.05, 1640),
    ("2DVMamba-T stage 1", (64, 384, 1, 4, 56, 56), 1.372, 4.77, 1548),
    ("2DVMamba-T stage 3", (64, 1536, 1, 4, 14, 14), 0.296, 1.39, 442),
    # VMamba-T stage 1's four 1D routes as one scan on a 1 x H*W grid (no H200 figure of the authors')
    ("VMamba-T stage 1, 1D routes", (64, 384, 1, 4, 1, 3136), None, None, None),
]


def make(shape, dtype=torch.float32, grad=True):
    b, d, n, g, h, w = shape
    dev = "cuda"
    t = dict(
        u=torch.randn(b, d, h, w, device=dev, dtype=dtype),
        delta=torch.randn(b, d, h, w, device=dev, dtype=dtype) * 0.5 - 1.0,
        A=-(torch.rand(d, n, device=dev) + 0.1),
        B=torch.randn(b, g, n, h, w, device=dev, dtype=dtype),
        C=torch.randn(b, g, n, h, w, device=dev, dtype=dtype),
        D=torch.randn(d, device=dev),
        z=torch.randn(b, d, h, w, device=dev, dtype=dtype),
        delta_bias=torch.randn(d, device=dev) * 0.3,
    )
    if grad:
        for v in t.values():
            v.requires_grad_(True)
    return t


def fwd(backend):
    def run(t):
        with torch.no_grad():
            return scan2d(**t, delta_softplus=True, backend=backend)
    return run


def fwd_bwd(backend):
    def run(t):
        out = scan2d(**t, delta_softplus=True, backend=backend)
        torch.autograd.grad(out, list(t.values()), t["_gout"])
    return run


def floor_bytes(shape, itemsize=4):
    b, d, n, g, h, w = shape
    # forward: read u, delta, z, B, C; write out (the pre-gate y saved for the backward is extra)
    return itemsize * (4 * b * d * h * w + 2 * b * g * n * h * w)


def measure_case(shape, fwd_only: bool, reference: bool, bw: float, dtype=torch.float32) -> dict:
    """One case alone: its inputs are the only tensors alive while its peak is measured."""
    strip = lambda s: {k: v for k, v in s.items() if k != "_gout"}  # noqa: E731
    step = lambda s: torch.autograd.grad(  # noqa: E731
        scan2d(**strip(s), delta_softplus=True, backend="kernel"), list(strip(s).values()), s["_gout"])
    gc.collect()
    torch.cuda.empty_cache()
    if torch.cuda.memory_allocated():
        print(f"warning: {torch.cuda.memory_allocated()} bytes alive before the case", file=sys.stderr)
    one = make(shape, dtype)
    one["_gout"] = torch.randn_like(one["u"])
    extra = None
    if not fwd_only:
        _, extra = peak_mib(step, one)
    sets = [one] + [make(shape, dtype) for _ in range(2)]
    for s in sets[1:]:
        s["_gout"] = torch.randn_like(s["u"])
    t_f = gpu_time_ms(lambda s: fwd("kernel")(strip(s)), sets)
    t_fb = None if fwd_only else gpu_time_ms(step, sets)
    ref_fb = None
    b, d, n, g, h, w = shape
    if reference and not fwd_only and b * d * n * h * w <= 80e6 and min(h, w) > 1:
        try:
            ref_fb = gpu_time_ms(lambda s: torch.autograd.grad(
                scan2d(**strip(s), delta_softplus=True, backend="reference"), list(strip(s).values()),
                s["_gout"]), sets, warmup=1, reps=3)
        except torch.OutOfMemoryError:
            ref_fb = None
    return dict(fwd_ms=t_f, fwd_bwd_ms=t_fb, extra_mib=extra, ref_fwd_bwd_ms=ref_fb,
                floor_fwd_ms=floor_bytes(shape, dtype.itemsize) / (bw * 1e9) * 1e3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--cases", default=",".join(str(i) for i in range(len(CASES))))
    ap.add_argument("--fwd-only", action="store_true", help="time the forward only (no peak, no backward)")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--dtype", default="float32", choices=DTYPES,
                    help="u, delta, z, B, C in this dtype (the authors' float32 figures are shown for float32 only)")
    args = ap.parse_args()
    dtype = DTYPES[args.dtype]
    bw = copy_bandwidth_gbs()
    rows = []
    for idx in map(int, args.cases.split(",")):
        name, shape, a_fwd, a_fb, a_mem = CASES[idx]
        r = measure_case(shape, args.fwd_only, not args.no_reference, bw, dtype)
        r.update(case=name, shape=shape, dtype=args.dtype)
        if dtype != torch.float32:
            a_fwd = a_fb = a_mem = None  # the authors' figures are float32 ones
        beside_authors(r, AUTHORS_DEVICE, a_fwd, a_fb, a_mem)
        rows.append(r)
    lines = [f"# scan2d benchmark ({args.dtype}, softplus, gated, D and delta_bias)", "", header(),
             f"measured copy bandwidth {bw:.0f} GB/s; " + authors_line(AUTHORS_DEVICE, "2DMamba's kernel", "first table"),
             ""] + authors_table(rows)
    suffix = ("_fwd" if args.fwd_only else "") + ("" if dtype == torch.float32 else f"_{args.dtype}")
    write_report(args.out, "bench_scan2d" + suffix, lines, rows)


if __name__ == "__main__":
    main()
