"""Small pieces the kernel-backed ops share."""

from __future__ import annotations

from typing import Callable, Optional

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


def raw_stream(device_index: int) -> int:
    """``stream_of`` for a known device index (-1: the CPU), without building a Stream object: the
    per-call path of the direct kernel calls."""
    return torch._C._cuda_getCurrentRawStream(device_index) if device_index >= 0 else 0


def tensor_meta(t: Optional[Tensor]) -> Optional[tuple]:
    """What an op's argument checks and kernel frames depend on: (type, shape, strides, dtype,
    device), None for None. Raises AttributeError for an object that is not a tensor."""
    return None if t is None else (type(t), t.shape, t.stride(), t.dtype, t.device)


# Tensor types whose kernel calls may skip the dispatcher: no subclass behaviour to honour.
PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def plain_tensors(*tensors: Optional[Tensor]) -> bool:
    """All given tensors (None allowed) are plain tensors (or parameters) on the CPU or a CUDA device:
    a kernel may read their memory directly."""
    return all(t is None or (type(t) in PLAIN_TENSOR_TYPES and t.device.type in ("cpu", "cuda")) for t in tensors)


def nothing_intercepts() -> bool:
    """No torch dispatch mode (fake tensors, flop counters, ...) and no functorch transform (vmap,
    grad) is active: a direct kernel call sees what the dispatcher would. Checked per call (cheap)."""
    return torch._C._len_torch_dispatch_stack() == 0 and torch._C._functorch.peek_interpreter_stack() is None


class PlanCache:
    """A bounded map from an op call's argument metadata (``tensor_meta`` of each tensor plus the
    string options) to what was derived from it once: validation done, backend chosen, kernel
    frames computed. A call whose metadata was seen before costs one dict lookup; any difference in
    shape, strides, dtype, device or type is another key, so it is checked again from scratch.
    Only successful calls are stored: a refused call raises on every attempt."""

    def __init__(self, build: Callable, maxsize: int = 1024):
        self._build, self._maxsize = build, maxsize
        self._plans: dict = {}

    def get(self, key, *args):
        """The plan of ``key``, built by ``build(*args)`` (which raises for a refused call) when new."""
        try:
            plan = self._plans.get(key)
        except TypeError:  # an unhashable option (say a list for a string): the checks refuse it
            return self._build(*args)
        if plan is None:
            plan = self._build(*args)
            if len(self._plans) >= self._maxsize:  # drop the oldest: insertion order
                del self._plans[next(iter(self._plans))]
            self._plans[key] = plan
        return plan

    def clear(self) -> None:
        self._plans.clear()

    def __len__(self) -> int:
        return len(self._plans)


def add_group_partials(total: Tensor, part: Tensor, c0: int, per_group: int, dim: int) -> None:
    """Adds per-channel partials of channels c0, c0+1, ... (along ``dim`` of ``part``) into the
    per-group totals (along ``dim`` of ``total``), channel order fixed: deterministic."""
    k, c = part.shape[dim], 0
    while c < k:
        grp = (c0 + c) // per_group
        end = min(k, (grp + 1) * per_group - c0)
        total.select(dim, grp).add_(part.narrow(dim, c, end - c).sum(dim=dim))
        c = end
