"""Small pieces the kernel-backed ops share."""

from __future__ import annotations

import torch
from torch import Tensor


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensors(op: str, named: tuple) -> None:
    """Each (name, tensor-or-None) is a float tensor, else a TypeError naming it."""
    for name, t in named:
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be float32, float16, bfloat16 or float64, got {t.dtype}")


def check_devices(op: str, named: tuple, u: Tensor) -> None:
    for name, t in named:
        if t is not None and t.device != u.device:
            raise ValueError(f"{op}: {name} is on {t.device} but u is on {u.device}")


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
