"""Small pieces the kernel-backed ops share."""

from __future__ import annotations

import torch
from torch import Tensor


def stream_of(t: Tensor) -> int:
    """The current CUDA stream handle of t's device (0 for CPU tensors): kernels launch there."""
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def add_group_partials(total: Tensor, part: Tensor, c0: int, per_group: int, dim: int) -> None:
    """Adds per-channel partials of channels c0, c0+1, ... (along ``dim`` of ``part``) into the
    per-group totals (along ``dim`` of ``total``), channel order fixed: deterministic."""
    k, c = part.shape[dim], 0
    while c < k:
        grp = (c0 + c) // per_group
        end = min(k, (grp + 1) * per_group - c0)
        total.select(dim, grp).add_(part.narrow(dim, c, end - c).sum(dim=dim))
        c = end
