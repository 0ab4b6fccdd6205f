"""scan2d on the GPU at the shapes of the spec's anchors: time, peak memory, floor, reference.

    python benchmarks/bench_scan2d.py [--out DIR] [--no-reference]

Forward and forward+backward medians (CUDA events, warm, inputs rotated among 3 fresh random sets),
peak memory of forward+backward (inputs included, as the anchors count it), the forward's
memory-traffic floor (bytes it must move / measured copy bandwidth) and the authors' kernel (H100).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import copy_bandwidth_gbs, gpu_time_ms, header, peak_mib, write_report  # noqa: E402

from ssm2d_nn.ops import scan2d  # noqa: E402

# name, (batch, D, N, G, H, W), authors' fwd ms, fwd+bwd ms, peak MiB (ANCHORS.md, H100, fp32)
CASES = [
    ("MIL 128x128", (1, 256, 16, 1, 128, 128), 0.73, 3.05, 130),
    ("MIL 200x200", (1, 256, 16, 1, 200, 200), 2.25, 8.96, 353),
    ("MIL 489x415", (1, 256, 16, 1, 489, 415), 9.96, 46.9, 1640),
    ("2DVMamba-T stage 1", (64, 384, 1, 4, 56, 56), 0.79, 3.65, 960),
    ("2DVMamba-T stage 3", (64, 1536, 1, 4, 14, 14), 0.20, 1.21, 293),
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--no-reference", action="store_true")
    args = ap.parse_args()
    bw = copy_bandwidth_gbs()
    rows = []
    for name, shape, a_fwd, a_fb, a_mem in CASES:
        strip = lambda s: {k: v for k, v in s.items() if k != "_gout"}  # noqa: E731
        # Peak memory first, with a single input set alive (the anchors count inputs too).
        one = make(shape)
        one["_gout"] = torch.randn_like(one["u"])
        mem, extra = peak_mib(lambda s: torch.autograd.grad(
            scan2d(**strip(s), delta_softplus=True, backend="kernel"), list(strip(s).values()), s["_gout"]), one)
        sets = [one] + [make(shape) for _ in range(2)]
        for s in sets[1:]:
            s["_gout"] = torch.randn_like(s["u"])
        t_f = gpu_time_ms(lambda s: fwd("kernel")(strip(s)), sets)
        t_fb = gpu_time_ms(lambda s: (lambda t: torch.autograd.grad(
            scan2d(**t, delta_softplus=True, backend="kernel"), list(t.values()), s["_gout"]))(strip(s)), sets)
        floor_ms = floor_bytes(shape) / (bw * 1e9) * 1e3
        ref_fb = None
        b, d, n, g, h, w = shape
        if not args.no_reference and b * d * n * h * w <= 80e6:
            try:
                ref_fb = gpu_time_ms(lambda s: torch.autograd.grad(
                    scan2d(**strip(s), delta_softplus=True, backend="reference"), list(strip(s).values()),
                    s["_gout"]), sets, warmup=1, reps=3)
            except torch.OutOfMemoryError:
                ref_fb = None
            torch.cuda.empty_cache()
        rows.append(dict(case=name, shape=shape, fwd_ms=t_f, fwd_bwd_ms=t_fb, peak_mib=mem, extra_mib=extra,
                         floor_fwd_ms=floor_ms, fwd_pct_of_floor=100 * floor_ms / t_f, ref_fwd_bwd_ms=ref_fb,
                         authors_fwd_ms=a_fwd, authors_fwd_bwd_ms=a_fb, authors_peak_mib=a_mem,
                         speedup_fwd_bwd=a_fb / t_fb))
        del sets, one
        torch.cuda.empty_cache()
    lines = [f"# scan2d benchmark (fp32, softplus, gated, D and delta_bias)", "", header(),
             f"measured copy bandwidth {bw:.0f} GB/s", "",
             "| case | fwd ms | fwd+bwd ms | authors fwd / fwd+bwd ms | speed-up fwd+bwd | peak MiB (authors) "
             "| fwd floor ms (% reached) | reference fwd+bwd ms |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = f"{r['ref_fwd_bwd_ms']:.2f}" if r["ref_fwd_bwd_ms"] else "—"
        lines.append(f"| {r['case']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | {r['authors_fwd_ms']} / "
                     f"{r['authors_fwd_bwd_ms']} | {r['speedup_fwd_bwd']:.1f}x | {r['peak_mib']:.0f} "
                     f"({r['authors_peak_mib']}) | {r['floor_fwd_ms']:.3f} ({r['fwd_pct_of_floor']:.0f}%) | {ref} |")
    write_report(args.out, "bench_scan2d", lines, rows)


if __name__ == "__main__":
    main()
