"""The fused CUDA ops of ssm2d-nn beside what PyTorch runs for them, at the models' shapes:
LayerNorm over channels (ssm2d_nn.ops.layer_norm vs torch.nn.functional.layer_norm), StarReLU
(ssm2d_nn.ops.star_relu vs relu, square and a broadcast multiply-add) and the depthwise
convolution (ssm2d_nn.ops.depthwise_conv2d vs F.conv2d(groups=C), both on NCHW input).

Per case: forward and forward+backward (all gradients) milliseconds of both, the ratio (PyTorch /
ours), and the forward's share of its bandwidth floor (x read once, y written once, at the measured
copy bandwidth). bf16 (autocast's dtype) unless the case says float32; fresh random inputs rotated
over 3 sets; CUDA events, medians.

    python benchmarks/bench_fused_ops.py [--out DIR] [--ops dwconv2d,star_relu]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import copy_bandwidth_gbs, gpu_time_ms, header, write_report  # noqa: E402

from ssm2d_nn.ops import depthwise_conv2d, layer_norm, star_relu, star_relu_reference  # noqa: E402

# op, name, rows, cols, dtype (StarReLU: rows * cols elements)
CASES = [
    ("layer_norm", "M2D-T stage 1 (b128, 56x56, C=64)", 128 * 3136, 64, torch.bfloat16),
    ("layer_norm", "M2D-T stage 2 (b128, 28x28, C=128)", 128 * 784, 128, torch.bfloat16),
    ("layer_norm", "M2D-T stage 3 (b128, 14x14, C=320)", 128 * 196, 320, torch.bfloat16),
    ("layer_norm", "M2D-T stage 3 QK-norm (10 heads of 32)", 128 * 196 * 10, 32, torch.bfloat16),
    ("layer_norm", "M2D-T stage 4 (b128, 7x7, C=512)", 128 * 49, 512, torch.bfloat16),
    ("layer_norm", "VMamba-T stage 1 (b64, 56x56, C=96)", 64 * 3136, 96, torch.bfloat16),
    ("layer_norm", "VMamba-T stage 1, float32", 64 * 3136, 96, torch.float32),
    ("star_relu", "M2D-T stage 1 local path (b128, 56x56, 128 ch)", 128 * 3136, 128, torch.bfloat16),
    ("star_relu", "M2D-T stage 2 local path (b128, 28x28, 256 ch)", 128 * 784, 256, torch.bfloat16),
    # depthwise convolution: (batch, C, H, W), k
    ("dwconv2d", "2DMambaMIL, 150k patches (1 x 256 x 428 x 553, 3x3)", (1, 256, 428, 553), 3, torch.bfloat16),
    ("dwconv2d", "2DMambaMIL, 150k patches, float32", (1, 256, 428, 553), 3, torch.float32),
    ("dwconv2d", "SS2D VMamba-T stage 1 (b64, 192 ch, 56x56, 3x3)", (64, 192, 56, 56), 3, torch.bfloat16),
    ("dwconv2d", "SS2D VMamba-T stage 3 (b64, 768 ch, 14x14, 3x3)", (64, 768, 14, 14), 3, torch.bfloat16),
    ("dwconv2d", "7x7 (b128, 128 ch, 56x56)", (128, 128, 56, 56), 7, torch.bfloat16),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--ops", default="layer_norm,star_relu,dwconv2d", help="comma-separated ops to measure")
    args = ap.parse_args()
    wanted = set(args.ops.split(","))
    if not torch.cuda.is_available():
        print("bench_fused_ops.py needs a CUDA device", file=sys.stderr)
        return 2
    bw = copy_bandwidth_gbs()
    rows_out = []
    for op, name, rows, cols, dtype in CASES:
        if op not in wanted:
            continue
        pcols = cols if op == "layer_norm" else 1
        shape = rows if op == "dwconv2d" else (rows, cols)  # dwconv2d: rows is (B, C, H, W), cols is k

        def make():
            x = (torch.randn(shape, device="cuda") * 2 + 1).to(dtype).requires_grad_(True)
            if op == "dwconv2d":
                w = (torch.randn(shape[1], 1, cols, cols, device="cuda") / cols).requires_grad_(True)
                b = torch.randn(shape[1], device="cuda").requires_grad_(True)
            else:
                w = (torch.randn(pcols, device="cuda") + 1).requires_grad_(True)
                b = torch.randn(pcols, device="cuda").requires_grad_(True)
            return x, w, b, torch.randn(shape, device="cuda").to(dtype)

        sets = [make() for _ in range(3)]

        if op == "dwconv2d":
            def ours(s):
                return depthwise_conv2d(s[0], s[1], s[2], backend="kernel")

            def theirs(s):  # what the layers ran before (autocast gives F.conv2d x's dtype)
                return F.conv2d(s[0], s[1].to(dtype), s[2].to(dtype), padding=cols // 2, groups=shape[1])
        elif op == "layer_norm":
            def ours(s):
                return layer_norm(s[0], (cols,), s[1], s[2], backend="kernel")

            def theirs(s):  # what the layers ran before: PyTorch's kernel, parameters in x's dtype
                return F.layer_norm(s[0], (cols,), s[1].to(dtype), s[2].to(dtype))
        else:
            def ours(s):
                return star_relu(s[0], s[1], s[2], backend="kernel")

            def theirs(s):
                return star_relu_reference(s[0], s[1], s[2])

        r = dict(op=op, case=name, rows=rows, cols=cols, dtype=str(dtype).removeprefix("torch."))
        cells = 1
        for v in shape:
            cells *= v
        for label, fn in (("ours", ours), ("torch", theirs)):
            def fwd(s, fn=fn):
                with torch.no_grad():
                    fn(s)

            def fwd_bwd(s, fn=fn):
                torch.autograd.grad(fn(s), s[:3], s[3])

            r[f"{label}_fwd_ms"] = gpu_time_ms(fwd, sets)
            r[f"{label}_fwd_bwd_ms"] = gpu_time_ms(fwd_bwd, sets)
        r["floor_fwd_ms"] = 2 * cells * sets[0][0].element_size() / (bw * 1e9) * 1e3
        rows_out.append(r)
        del sets
    lines = ["# Fused ops: ssm2d-kernels kernels vs what PyTorch runs for them", "", header(),
             f"measured copy bandwidth {bw:.0f} GB/s; ratio = PyTorch's time / ours; floor: x read + y written once",
             "", "| op | case | dtype | ours fwd / fwd+bwd ms | PyTorch fwd / fwd+bwd ms | ratio fwd / fwd+bwd | fwd floor ms "
             "(% reached by ours) |", "|---|---|---|---|---|---|---|"]
    for r in rows_out:
        lines.append(f"| {r['op']} | {r['case']} | {r['dtype']} | {r['ours_fwd_ms']:.3f} / {r['ours_fwd_bwd_ms']:.3f} | "
                     f"{r['torch_fwd_ms']:.3f} / {r['torch_fwd_bwd_ms']:.3f} | "
                     f"{r['torch_fwd_ms'] / r['ours_fwd_ms']:.2f} / {r['torch_fwd_bwd_ms'] / r['ours_fwd_bwd_ms']:.2f} | "
                     f"{r['floor_fwd_ms']:.4f} ({100 * r['floor_fwd_ms'] / r['ours_fwd_ms']:.0f}%) |")
    write_report(args.out, "bench_fused_ops", lines, rows_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
