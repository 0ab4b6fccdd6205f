"""Small pieces the kernel-backed ops share."""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# The compiled kernels' dtype codes (ssm2d::DType) of the dtypes their CUDA kernels take.
CUDA_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


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


def raw_stream(device_index: int) -> int:
    """The current CUDA stream handle of a device (0 for the CPU, index -1): kernels launch there.
    Read without building a torch.cuda.Stream object, which costs more than the rest of a call's
    descriptors."""
    return torch._C._cuda_getCurrentRawStream(device_index) if device_index >= 0 else 0


_COMPILED = None


def compiled():
    """The compiled kernels module (imported on first use: ssm2d-nn imports without a kernel wheel;
    kept afterwards: an import statement per kernel call is measurable host time)."""
    global _COMPILED
    if _COMPILED is None:
        from ssm2d_kernels import _C

        _COMPILED = _C
    return _COMPILED


def scratch(floats: int, like: Tensor) -> Optional[Tensor]:
    """A float32 scratch buffer of ``floats`` values on ``like``'s device, or None when none is needed.
    The caller keeps it alive until the kernel call that uses it has been launched."""
    return torch.empty(floats, dtype=torch.float32, device=like.device) if floats else None


def data_ptr(t) -> Optional[int]:
    """A kernel argument's pointer: None for None or an empty tensor; an int is already a pointer
    (a block inside a larger buffer, passed without making a view of it)."""
    if isinstance(t, int):
        return t
    return None if t is None or t.numel() == 0 else t.data_ptr()


def at_layout(t, layout: tuple) -> Optional[tuple]:
    """A grid descriptor from a layout precomputed at pointer 0 (byte offset first): the data pointer
    added. ``t`` is a tensor, None, or an int data pointer."""
    if t is None:
        return None
    return ((t if isinstance(t, int) else t.data_ptr()) + layout[0],) + tuple(layout[1:])


def contiguous_strides(shape) -> tuple:
    """The strides of a fresh contiguous tensor of ``shape`` (nothing allocated)."""
    return torch.empty(shape, device="meta").stride()


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


class OpPlan(NamedTuple):
    """What one argument layout of an op needs, derived once: arguments checked, backend chosen."""

    backend: str  # "kernel" or "reference"
    param_dtype: torch.dtype  # the parameters (A, D, ...) as the kernels read them
    cast_params: bool  # a parameter must first be converted to param_dtype (or made contiguous)
    frame: object = None  # kernel backend, plain tensors on the CPU or CUDA: the kernel calls' frame


class PlanCache:
    """A bounded map from an op call's argument layout (type, shape, strides, dtype and device of each
    tensor, None for None, plus the options) to its OpPlan, built once by
    ``build(*tensors, *options)``. A call whose layout was
    seen before costs the key and one dict lookup; any difference in shape, strides, dtype, device
    or type is another key, so it is checked again from scratch. Only successful calls are stored:
    ``build`` raises for a refused call, on every attempt."""

    def __init__(self, build: Callable[..., OpPlan], maxsize: int = 1024):
        self._build, self._maxsize = build, maxsize
        self._plans: dict = {}

    def plan(self, tensors: tuple, options: tuple) -> OpPlan:
        try:
            # Flat and built inline (no call per tensor): this key is most of a call's Python time.
            key = list(options)
            for t in tensors:
                if t is None:
                    key.append(None)
                else:
                    key += (type(t), t.shape, t.stride(), t.dtype, t.device)
            key = tuple(key)
            plan = self._plans.get(key)
        except (AttributeError, TypeError):  # not a tensor, or an unhashable option: the checks refuse it
            return self._build(*tensors, *options)
        if plan is None:
            plan = self._build(*tensors, *options)
            if len(self._plans) >= self._maxsize:  # drop the oldest: insertion order
                del self._plans[next(iter(self._plans))]
            self._plans[key] = plan
        return plan


def dout_in_dtype(dout: Tensor, like: Tensor) -> Tensor:
    """The incoming gradient in ``like``'s dtype, the one the kernels read it in (a copy when it
    differs). Autograd hands a node the gradient in its output's dtype, and an output need not be in
    the inputs' dtype (a reduction autocast ran in float32, say): a backward must not read float32
    bytes as bfloat16 ones. Callers keep the returned tensor alive until the kernels are launched."""
    return dout if dout.dtype == like.dtype else dout.to(like.dtype)


def refuse_double_backward(op: str, *tensors: Optional[Tensor]) -> None:
    """The kernels' backward is not differentiable: say so when a graph of it is asked for."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(f"{op}: double backward (a gradient taken with create_graph=True) is not supported by "
                           "the kernel backend; use backend='reference' for higher-order gradients")


def add_group_partials(total: Tensor, part: Tensor, c0: int, per_group: int, dim: int) -> None:
    """Adds per-channel partials of channels c0, c0+1, ... (along ``dim`` of ``part``) into the
    per-group totals (along ``dim`` of ``total``), channel order fixed: deterministic."""
    k, c = part.shape[dim], 0
    while c < k:
        grp = (c0 + c) // per_group
        end = min(k, (grp + 1) * per_group - c0)
        total.select(dim, grp).add_(part.narrow(dim, c, end - c).sum(dim=dim))
        c = end
