"""wavefront2d on the GPU at the shapes of the spec's anchors, next to the authors' kernel measured on an H200.

    python benchmarks/bench_wavefront2d.py [--out DIR] [--cases 0,5] [--fwd-only] [--no-reference]

bf16, N=16, with D, on given dT, dL, A, B, C (projections not timed), B=1, E=64 grids 64^2 .. 4096^2 and
the M2D-T layer shapes. Forward and forward+backward medians (CUDA events, warm, inputs rotated among 3
fresh random sets), the authors' figures (Mamba2D's wf_cuda_fn_pr, measured on one NVIDIA H200 side by
side with ssm2d 139592e: the spec's ANCHORS.md, first section) and the ratio authors / ours, the
forward's memory-traffic floor (bytes it must move / measured copy bandwidth), and the peak memory of
forward+backward BEYOND the inputs, each case measured alone (nothing of an earlier case alive), next
to the authors' beyond-inputs figure.
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

from ssm2d_nn.ops import wavefront2d  # noqa: E402

AUTHORS_DEVICE = "NVIDIA H200"
# name, (batch, H, W, E, N), authors' fwd ms, fwd+bwd ms, peak beyond inputs MiB (ANCHORS.md, H200;
# None: not measured there)
CASES = [
    ("64x64", (1, 64, 64, 64, 16), 1.248, 4.20, 33),
    ("128x128", (1, 128, 128, 64, 16), 2.231, 6.55, 131),
    ("256x256", (1, 256, 256, 64, 16), 3.808, 12.64, 523),
    ("512x512", (1, 512, 512, 64, 16), 10.573, 34.27, 2090),
    ("1024x1024", (1, 1024, 1024, 64, 16), 33.312, 112.91, 8356),
    ("2048x2048 (fwd)", (1, 2048, 2048, 64, 16), None, None, None),
    ("M2D-T layer 56x56", (64, 56, 56, 64, 16), 5.646, 20.03, 1614),
    ("M2D-T layer 28x28", (64, 28, 28, 128, 16), 2.990, 10.47, 812),
    ("4096x4096", (1, 4096, 4096, 64, 16), None, None, None),  # both sides > 2048: column strips, no transpose
]
FWD_ONLY = {"2048x2048 (fwd)"}


def make(shape, dtype=torch.bfloat16):
    b, h, w, e, n = shape
    dev = "cuda"
    t = dict(u=torch.randn(b, h, w, e, device=dev, dtype=dtype),
             dT=(torch.rand(b, h, w, e, device=dev) * 0.5 + 0.05).to(dtype),
             dL=(torch.rand(b, h, w, e, device=dev) * 0.5 + 0.05).to(dtype),
             AT=-(torch.rand(e, n, device=dev) + 0.5), AL=-(torch.rand(e, n, device=dev) + 0.5),
             BT=torch.randn(b, h, w, n, device=dev, dtype=dtype), BL=torch.randn(b, h, w, n, device=dev, dtype=dtype),
             C=torch.randn(b, h, w, n, device=dev, dtype=dtype), D=torch.randn(e, device=dev))
    for v in t.values():
        v.requires_grad_(True)
    return t


def floor_bytes(shape, itemsize=2):
    b, h, w, e, n = shape
    return itemsize * (4 * b * h * w * e + 3 * b * h * w * n)  # read u, dT, dL, BT, BL, C; write y


def measure_case(shape, fwd_only: bool, reference: bool, bw: float) -> dict:
    """One case alone: its inputs (and the output gradient) are the only tensors alive at its peak."""
    strip = lambda s: {k: v for k, v in s.items() if k != "_g"}  # noqa: E731
    step = lambda s: torch.autograd.grad(wavefront2d(**strip(s), backend="kernel"), list(strip(s).values()), s["_g"])  # noqa: E731

    def fstep(s):
        with torch.no_grad():
            return wavefront2d(**strip(s), backend="kernel")

    gc.collect()
    torch.cuda.empty_cache()
    if torch.cuda.memory_allocated():
        print(f"warning: {torch.cuda.memory_allocated()} bytes alive before the case", file=sys.stderr)
    one = make(shape)
    one["_g"] = torch.randn_like(one["u"])
    extra = peak_mib(fstep if fwd_only else step, one)[1]
    sets = [one] + [make(shape) for _ in range(2)]
    for s in sets[1:]:
        s["_g"] = torch.randn_like(s["u"])
    reps = 5 if shape[1] >= 4096 else 10 if shape[1] >= 1024 else 30
    t_f = gpu_time_ms(fstep, sets, reps=reps)
    t_fb = None if fwd_only else gpu_time_ms(step, sets, reps=reps)
    ref = None
    b, h, w, e, n = shape
    if reference and not fwd_only and b * h * w * e * n <= 5e6:
        ref = gpu_time_ms(lambda s: torch.autograd.grad(wavefront2d(**strip(s), backend="reference"),
                                                        list(strip(s).values()), s["_g"]), sets, warmup=1, reps=3)
    del sets, one
    return dict(fwd_ms=t_f, fwd_bwd_ms=t_fb, extra_mib=extra, ref_fwd_bwd_ms=ref,
                floor_fwd_ms=floor_bytes(shape) / (bw * 1e9) * 1e3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--cases", default=",".join(str(i) for i in range(len(CASES))))
    ap.add_argument("--fwd-only", action="store_true", help="time the forward only (peak of the forward)")
    ap.add_argument("--no-reference", action="store_true")
    args = ap.parse_args()
    bw = copy_bandwidth_gbs()
    rows = []
    for idx in map(int, args.cases.split(",")):
        name, shape, a_fwd, a_fb, a_mem = CASES[idx]
        fwd_only = args.fwd_only or name in FWD_ONLY
        r = measure_case(shape, fwd_only, not args.no_reference, bw)
        r.update(case=name, shape=shape, fwd_only=fwd_only)
        beside_authors(r, AUTHORS_DEVICE, a_fwd, a_fb, a_mem)
        rows.append(r)
    lines = ["# wavefront2d benchmark (bf16, N=16, with D)", "", header(),
             f"measured copy bandwidth {bw:.0f} GB/s; " + authors_line(AUTHORS_DEVICE, "Mamba2D's kernel", "first section")
             + "; peak: forward+backward (forward alone for fwd-only cases)", ""] + authors_table(rows)
    write_report(args.out, "bench_wavefront2d" + ("_fwd" if args.fwd_only else ""), lines, rows)


if __name__ == "__main__":
    main()
