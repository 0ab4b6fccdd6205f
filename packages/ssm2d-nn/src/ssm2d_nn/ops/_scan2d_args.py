"""Argument checks, cached per argument layout, and the origin/order frame mapping shared by both
scan2d backends."""

from __future__ import annotations

from typing import Optional

import torch

from .. import backends
from . import _scan2d_kernel as K
from ._common import OpPlan, PlanCache, check_devices, check_tensors, plain_tensors

ORIGINS = ("tl", "tr", "bl", "br")
ORDERS = ("hv", "vh")


def to_logical(t: torch.Tensor, origin: str, order: str) -> torch.Tensor:
    """(..., H, W) physical -> the frame in which the scan runs rows first from the top-left."""
    if origin in ("bl", "br"):
        t = t.flip(-2)
    if origin in ("tr", "br"):
        t = t.flip(-1)
    return t.transpose(-1, -2) if order == "vh" else t


def from_logical(t: torch.Tensor, origin: str, order: str) -> torch.Tensor:
    if order == "vh":
        t = t.transpose(-1, -2)
    if origin in ("tr", "br"):
        t = t.flip(-1)
    if origin in ("bl", "br"):
        t = t.flip(-2)
    return t


def _shape(t: torch.Tensor, name: str, expected: tuple, what: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"scan2d: {name} must have shape {what} = {tuple(expected)}, got {tuple(t.shape)}")


def check_scan2d_args(u, delta, A, B, C, D, z, delta_bias, origin, order) -> None:
    """Raises TypeError/ValueError naming the argument and what was expected."""
    named = (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
             ("delta_bias", delta_bias))
    check_tensors("scan2d", named)
    if origin not in ORIGINS:
        raise ValueError(f"scan2d: origin must be one of {ORIGINS}, got {origin!r}")
    if order not in ORDERS:
        raise ValueError(f"scan2d: order must be one of {ORDERS}, got {order!r}")
    if u.dim() != 4:
        raise ValueError(f"scan2d: u must have shape (batch, D, H, W), got {tuple(u.shape)}")
    b, d, h, w = u.shape
    if h < 1 or w < 1:
        raise ValueError(f"scan2d: u must have H >= 1 and W >= 1, got H={h}, W={w}")
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"scan2d: A must have shape (D, N) with D={d}, got {tuple(A.shape)}")
    if B.dim() != 5:
        raise ValueError(f"scan2d: B must have shape (batch, G, N, H, W), got {tuple(B.shape)}")
    g, n = B.shape[1], A.shape[1]
    if g < 1 or d % g:
        raise ValueError(f"scan2d: B has G={g} groups, which must divide D={d}")
    _shape(B, "B", (b, g, n, h, w), "(batch, G, N, H, W)")
    _shape(C, "C", (b, g, n, h, w), "(batch, G, N, H, W)")
    _shape(delta, "delta", u.shape, "(batch, D, H, W) like u")
    if z is not None:
        _shape(z, "z", u.shape, "(batch, D, H, W) like u")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None:
            _shape(t, name, (d,), "(D,)")
    for name, t in (("delta", delta), ("B", B), ("C", C), ("z", z)):
        if t is not None and t.dtype != u.dtype:
            raise TypeError(f"scan2d: {name} must have the dtype of u ({u.dtype}), got {t.dtype}")
    check_devices("scan2d", named[1:], u)


def _needs_cast(t: Optional[torch.Tensor], dtype: torch.dtype, contiguous: bool) -> bool:
    return t is not None and (t.dtype != dtype or (contiguous and not t.is_contiguous()))


def checked_plan(u, delta, A, B, C, D, z, delta_bias, origin, order, backend) -> OpPlan:
    """The plan without a kernel frame: the arguments checked and the backend chosen. This is all
    that runs while torch.compile traces (the custom ops then run the kernels inside the graph)."""
    check_scan2d_args(u, delta, A, B, C, D, z, delta_bias, origin, order)
    unsupported = "the CUDA kernel takes float32, float16 or bfloat16, not float64" if (
        u.is_cuda and u.dtype == torch.float64) else None
    which = backends.resolve_backend("scan2d", backend, u.device, unsupported=unsupported)
    pdt = torch.float64 if u.dtype == torch.float64 else torch.float32
    cast = _needs_cast(A, pdt, False) or _needs_cast(D, pdt, True) or _needs_cast(delta_bias, pdt, True)
    return OpPlan(which, pdt, cast)


def _build_plan(u, delta, A, B, C, D, z, delta_bias, origin, order, backend) -> OpPlan:
    plan = checked_plan(u, delta, A, B, C, D, z, delta_bias, origin, order, backend)
    if plan.backend == "kernel" and plain_tensors(u, delta, A, B, C, D, z, delta_bias):
        plan = plan._replace(frame=K.frame(u, delta, A, B, C, z, origin, order, plan.param_dtype))
    return plan


_PLANS = PlanCache(_build_plan)


def scan2d_plan(u, delta, A, B, C, D, z, delta_bias, origin: str, order: str, backend: str) -> OpPlan:
    """The checked plan of a scan2d call; raises TypeError/ValueError (and BackendUnavailableError)
    exactly as ``check_scan2d_args`` and ``backends.resolve_backend`` do. The checks run once per
    argument layout (type, shape, strides, dtype and device of every tensor, and the options)."""
    return _PLANS.plan((u, delta, A, B, C, D, z, delta_bias), (origin, order, backend))
