"""The depthwise convolution in front of the 2D scans, ``Conv2d(C, C, k, padding=k//2, groups=C)``:
one CUDA kernel per direction (ssm2d-kernels).

PyTorch runs a channels-first (NCHW) half-precision depthwise convolution with its own generic
kernels: at the 2DMambaMIL grid of 150k patches (1 x 256 x 428 x 553, bfloat16, 3x3) ~0.29 ms
forward and ~1.6 ms backward (its weight gradient alone ~1.1 ms) where one pass over the bytes
needs ~0.06 and ~0.1 ms. The kernel stages a tile and its halo once in shared memory; its backward
computes dx, dweight and dbias in one pass over dy and x, the sums in a fixed order (deterministic).

Backends as :func:`ssm2d_nn.ops.layer_norm`: "kernel" (CUDA, square kernels of 3, 5 or 7, x
contiguous NCHW; raises, saying why, when the call does not fit), "reference" (``F.conv2d``, also
what the CPU runs), "auto" (the kernel where it fits, else ``F.conv2d``; which one runs is logged once
per reason at INFO level). Channels-last inputs go to ``F.conv2d`` under "auto" (cuDNN takes them
without a layout copy); "kernel" copies them to NCHW. So do planes of fewer than 1024 cells under
"auto" (a 14 x 14 plane fills a fifth of the kernel's 16 x 64 tile: PyTorch was faster there).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backends import kernel_unavailable_reason, resolve_fused
from ._common import CUDA_DTYPE_CODES, compiled, nothing_intercepts, plain_tensors, raw_stream, refuse_double_backward

__all__ = ["depthwise_conv2d", "depthwise_conv2d_reference", "DWCONV_KERNEL_SIZES"]

DWCONV_KERNEL_SIZES = (3, 5, 7)
# Under "auto", planes smaller than this run F.conv2d (the kernel's 16 x 64 tiles are mostly idle).
SMALL_PLANE_CELLS = 1024


def depthwise_conv2d_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=k//2, groups=C)`` (the parameters cast to x's dtype)."""
    kh, kw = weight.shape[-2:]
    return F.conv2d(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), padding=(kh // 2, kw // 2),
                    groups=x.shape[1])


def _check(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"depthwise_conv2d: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 4:
        raise ValueError(f"depthwise_conv2d: x must have shape (batch, C, H, W), got {tuple(x.shape)}")
    c = x.shape[1]
    if weight.dim() != 4 or weight.shape[0] != c or weight.shape[1] != 1:
        raise ValueError(f"depthwise_conv2d: weight must have shape (C, 1, kh, kw) with C = {c}, got {tuple(weight.shape)}")
    kh, kw = weight.shape[-2:]
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"depthwise_conv2d: the kernel must have odd sizes (padding k // 2 keeps H x W), got {kh}x{kw}")
    if bias is not None and tuple(bias.shape) != (c,):
        raise ValueError(f"depthwise_conv2d: bias must have shape (C,) = ({c},), got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"depthwise_conv2d: {name} is on {t.device} but x is on {x.device}")


@torch.compiler.assume_constant_result
def _decide(backend: str, device_type: str, index: int, dtype: torch.dtype, kh: int, kw: int, nchw: bool,
            small: bool) -> str:
    def refusal():
        if device_type != "cuda":
            return f"the depthwise convolution kernel runs on CUDA only (x is on {device_type})"
        if dtype not in CUDA_DTYPE_CODES:
            return f"the depthwise convolution kernel takes float32, float16 or bfloat16 (x is {dtype})"
        if kh != kw or kh not in DWCONV_KERNEL_SIZES:
            return f"the depthwise convolution kernel takes 3x3, 5x5 or 7x7 kernels (got {kh}x{kw})"
        if not nchw and backend == "auto":
            return "x is not contiguous NCHW (cuDNN takes channels-last without a copy)"
        if small and backend == "auto":
            # 14 x 14 planes fill a fifth of a 16 x 64 tile: PyTorch's kernel was faster there
            # (results/2026-12-06-h100-dwconv2d-cc638c3).
            return f"planes of fewer than {SMALL_PLANE_CELLS} cells are faster in F.conv2d"
        return kernel_unavailable_reason(torch.device(device_type, index) if index >= 0 else torch.device(device_type))
    return resolve_fused("depthwise_conv2d", backend, device_type, refusal, "F.conv2d")


def depthwise_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, backend: str = "auto") -> Tensor:
    """``F.conv2d(x, weight, bias, padding=(kh // 2, kw // 2), groups=C)``: stride 1, same size.

    Args:
        x: (batch, C, H, W), float32 / float16 / bfloat16 (float64: reference only).
        weight: (C, 1, kh, kw), odd sizes; bias: (C,) or None. Read in float32 by the kernel.
        backend: "auto", "kernel" or "reference" (module docstring).

    Returns:
        (batch, C, H, W) in x's dtype (under autocast, the autocast dtype, as ``F.conv2d`` would);
        accumulation in float32. Memory: the output; the backward keeps x and the weight, and needs
        float32 partial sums of (kh*kw + 1) values per channel and tile of 16 x 64 cells.
    """
    _check(x, weight, bias)
    if torch.is_autocast_enabled(x.device.type) and x.dtype == torch.float32:
        # F.conv2d runs in the autocast dtype; so does this op (its parameters stay float32).
        x = x.to(torch.get_autocast_dtype(x.device.type))
    kh, kw = weight.shape[-2:]
    nchw = x.is_contiguous()
    chosen = _decide(backend, x.device.type, -1 if x.device.index is None else x.device.index, x.dtype, kh, kw, nchw,
                     bool(x.shape[2] * x.shape[3] < SMALL_PLANE_CELLS))
    if chosen == "reference":
        return depthwise_conv2d_reference(x, weight, bias)
    if not nchw:
        x = x.contiguous()
    # The kernel's parameters: (C, k*k) and (C,) float32 (views when they already are; autograd
    # carries the gradients back through the casts).
    w = weight.reshape(weight.shape[0], kh * kw).to(torch.float32).contiguous()
    b = None if bias is None else bias.to(torch.float32).contiguous()
    if torch.compiler.is_compiling() or not nothing_intercepts() or not plain_tensors(x, w, b):
        return torch.ops.ssm2d.dwconv2d_fwd(x, w, b, kh)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w, b))):
        return _forward(x, w, b, kh)
    return _DwConv2dFunction.apply(x, w, b, kh)


def _forward(x: Tensor, w: Tensor, b: Optional[Tensor], k: int) -> Tensor:
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    n, c, h, wd = x.shape
    dev = x.device.index
    compiled().dwconv2d_forward(x.data_ptr(), y.data_ptr(), n, c, h, wd, k, w.data_ptr(), 0 if b is None else b.data_ptr(),
                                CUDA_DTYPE_CODES[x.dtype], dev, raw_stream(dev))
    return y


def _backward(dy: Tensor, x: Tensor, w: Tensor, k: int, need_x: bool, need_w: bool, need_b: bool):
    """dx (x's dtype, NCHW) or None, dweight (C, k*k) float32 or None, dbias (C,) float32 or None."""
    n, c, h, wd = x.shape
    dy = dy.to(x.dtype).contiguous()
    dx = torch.empty_like(x) if need_x else None
    dw = torch.empty((c, k * k), dtype=torch.float32, device=x.device) if need_w else None
    db = torch.empty((c,), dtype=torch.float32, device=x.device) if need_b else None
    C = compiled()
    ws = None
    if need_w or need_b:
        ws = torch.empty(C.dwconv2d_backward_workspace_floats(n, c, h, wd, k), dtype=torch.float32, device=x.device)
    dev = x.device.index
    ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
    C.dwconv2d_backward(dy.data_ptr(), x.data_ptr(), ptr(dx), n, c, h, wd, k, w.data_ptr(), ptr(dw), ptr(db), ptr(ws),
                        CUDA_DTYPE_CODES[x.dtype], dev, raw_stream(dev))
    return dx, dw, db


class _DwConv2dFunction(torch.autograd.Function):
    """The eager kernel path's autograd (the custom ops' forward and backward without the dispatcher)."""

    @staticmethod
    def forward(ctx, x, w, b, k):
        ctx.save_for_backward(x, w)
        ctx.k = k
        return _forward(x, w, b, k)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        refuse_double_backward("depthwise_conv2d", dy, x, w)
        need = ctx.needs_input_grad
        dx, dw, db = _backward(dy, x, w, ctx.k, need[0], need[1], need[2])
        return dx, dw, db, None


@torch.library.custom_op("ssm2d::dwconv2d_fwd", mutates_args=())
def dwconv2d_fwd(x: Tensor, w: Tensor, b: Optional[Tensor], k: int) -> Tensor:
    return _forward(x, w, b, k)


@dwconv2d_fwd.register_fake
def _(x, w, b, k):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("ssm2d::dwconv2d_bwd", mutates_args=())
def dwconv2d_bwd(dy: Tensor, x: Tensor, w: Tensor, k: int, need_x: bool, need_w: bool,
                 need_b: bool) -> tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = _backward(dy, x, w, k, need_x, need_w, need_b)
    # A custom op returns tensors: empty ones stand for "not asked for".
    empty = x.new_empty(0, dtype=torch.float32)
    return (x.new_empty(0) if dx is None else dx, empty if dw is None else dw, empty.clone() if db is None else db)


@dwconv2d_bwd.register_fake
def _(dy, x, w, k, need_x, need_w, need_b):
    c = x.shape[1]
    return (torch.empty_like(x) if need_x else x.new_empty(0),
            x.new_empty((c, k * k) if need_w else (0,), dtype=torch.float32),
            x.new_empty((c,) if need_b else (0,), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    x, w, b, k = inputs
    ctx.save_for_backward(x, w)
    ctx.k = k


def _autograd_backward(ctx, dy):
    x, w = ctx.saved_tensors
    refuse_double_backward("depthwise_conv2d", dy, x, w)
    need = ctx.needs_input_grad
    dx, dw, db = torch.ops.ssm2d.dwconv2d_bwd(dy, x, w, ctx.k, need[0], need[1], need[2])
    return (dx if need[0] else None), (dw if need[1] else None), (db if need[2] else None), None


torch.library.register_autograd("ssm2d::dwconv2d_fwd", _autograd_backward, setup_context=_setup_context)
