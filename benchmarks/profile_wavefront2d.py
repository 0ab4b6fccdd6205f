"""One forward and one forward+backward of wavefront2d at a benchmark shape (for ncu / profilers).

    ncu --kernel-name regex:wave_ --launch-count 2 python benchmarks/profile_wavefront2d.py --case 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_wavefront2d import CASES, make  # noqa: E402

from ssm2d_nn.ops import wavefront2d  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--case", type=int, default=2)
args = ap.parse_args()
t = make(CASES[args.case][1])
out = wavefront2d(**t, backend="kernel")
torch.autograd.grad(out, list(t.values()), torch.randn_like(out))
torch.cuda.synchronize()
