"""wavefront2d on the GPU at the shapes of the spec's anchors: time, peak memory, floor, reference.

    python benchmarks/bench_wavefront2d.py [--out DIR] [--no-reference]

bf16, B=1, E=64, N=16 for grids 64^2 .. 2048^2 and the M2D-T layer shapes. Medians of CUDA events
(warm, 3 rotating fresh input sets); peak memory of forward+backward with one input set alive,
inputs included; the forward floor = bytes it must move / measured copy bandwidth. The authors'
figures (H100) include their small x_proj/dt_proj projections; ours time the scan alone.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import copy_bandwidth_gbs, gpu_time_ms, header, peak_mib, write_report  # noqa: E402

from ssm2d_nn.ops import wavefront2d  # noqa: E402

# name, (batch, H, W, E, N), authors' fwd ms, fwd+bwd ms (None: not measured), peak MiB
CASES = [
    ("64x64", (1, 64, 64, 64, 16), 1.29, 5.64, 80),
    ("128x128", (1, 128, 128, 64, 16), 2.73, 8.68, 141),
    ("256x256", (1, 256, 256, 64, 16), 5.36, 16.8, 563),
    ("512x512", (1, 512, 512, 64, 16), 11.2, 40.3, 2246),
    ("1024x1024", (1, 1024, 1024, 64, 16), 36.6, 126.0, 8980),
    ("2048x2048 (fwd)", (1, 2048, 2048, 64, 16), 146.0, None, 19392),
    ("M2D-T layer 56x56", (64, 56, 56, 64, 16), None, 20.5, 1780),
    ("M2D-T layer 28x28", (64, 28, 28, 128, 16), None, 12.3, 890),
]


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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--no-reference", action="store_true")
    args = ap.parse_args()
    bw = copy_bandwidth_gbs()
    rows = []
    for name, shape, a_fwd, a_fb, a_mem in CASES:
        fwd_only = a_fb is None
        one = make(shape)
        one["_g"] = torch.randn_like(one["u"])
        strip = lambda s: {k: v for k, v in s.items() if k != "_g"}  # noqa: E731
        step = lambda s: torch.autograd.grad(wavefront2d(**strip(s), backend="kernel"), list(strip(s).values()), s["_g"])  # noqa: E731
        fstep = lambda s: (lambda: wavefront2d(**strip(s), backend="kernel"))()  # noqa: E731
        with torch.no_grad():
            mem_f, _ = peak_mib(fstep, one)
        mem = mem_f if fwd_only else peak_mib(step, one)[0]
        sets = [one] + [make(shape) for _ in range(2)]
        for s in sets[1:]:
            s["_g"] = torch.randn_like(s["u"])
        with torch.no_grad():
            t_f = gpu_time_ms(fstep, sets, reps=10 if shape[1] >= 1024 else 30)
        t_fb = None if fwd_only else gpu_time_ms(step, sets, reps=10 if shape[1] >= 1024 else 30)
        ref = None
        b, h, w, e, n = shape
        if not args.no_reference and b * h * w * e * n <= 5e6:
            ref = gpu_time_ms(lambda s: torch.autograd.grad(wavefront2d(**strip(s), backend="reference"),
                                                            list(strip(s).values()), s["_g"]), sets, warmup=1, reps=3)
        floor_ms = floor_bytes(shape) / (bw * 1e9) * 1e3
        rows.append(dict(case=name, shape=shape, fwd_ms=t_f, fwd_bwd_ms=t_fb, peak_mib=mem, floor_fwd_ms=floor_ms,
                         ref_fwd_bwd_ms=ref, authors_fwd_ms=a_fwd, authors_fwd_bwd_ms=a_fb, authors_peak_mib=a_mem))
        del sets, one
        torch.cuda.empty_cache()
    fmt = lambda v, p=3: "—" if v is None else f"{v:.{p}f}"  # noqa: E731
    lines = ["# wavefront2d benchmark (bf16, N=16, with D)", "", header(), f"measured copy bandwidth {bw:.0f} GB/s", "",
             "| case | fwd ms | fwd+bwd ms | authors fwd / fwd+bwd ms | speed-up fwd / fwd+bwd | peak MiB (authors) "
             "| fwd floor ms | reference fwd+bwd ms |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sf = "—" if r["authors_fwd_ms"] is None else f"{r['authors_fwd_ms'] / r['fwd_ms']:.1f}x"
        sfb = "—" if (r["authors_fwd_bwd_ms"] is None or r["fwd_bwd_ms"] is None) else \
            f"{r['authors_fwd_bwd_ms'] / r['fwd_bwd_ms']:.1f}x"
        lines.append(f"| {r['case']} | {fmt(r['fwd_ms'])} | {fmt(r['fwd_bwd_ms'])} | {fmt(r['authors_fwd_ms'], 2)} / "
                     f"{fmt(r['authors_fwd_bwd_ms'], 2)} | {sf} / {sfb} | {r['peak_mib']:.0f} ({r['authors_peak_mib']}) "
                     f"| {r['floor_fwd_ms']:.3f} | {fmt(r['ref_fwd_bwd_ms'], 1)} |")
    write_report(args.out, "bench_wavefront2d", lines, rows)


if __name__ == "__main__":
    main()
