"""StarReLU, ``scale * relu(x)**2 + bias`` with scalar parameters: one CUDA pass (ssm2d-kernels).

PyTorch runs it as three kernels (relu, square, and a multiply-add whose broadcast scalars make it
run unvectorized): ~226 us per call at M2D-T's stage-1 local path on an H200, where one read and
one write of x need ~50. The kernel reads the scalars on the device (no synchronisation) and
returns x's dtype, computing in float32.

Backends as :func:`ssm2d_nn.ops.layer_norm`: "kernel" (CUDA; raises, saying why, when the call does
not fit), "reference" (the PyTorch formula, also what the CPU runs), "auto" (the kernel where it
fits; which one runs is logged once per reason at INFO level).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backends import kernel_unavailable_reason, resolve_fused
from ._common import CUDA_DTYPE_CODES, compiled, nothing_intercepts, plain_tensors, raw_stream, refuse_double_backward

__all__ = ["star_relu", "star_relu_reference"]


def star_relu_reference(x: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    """The PyTorch formula in x's dtype (the parameters cast to it)."""
    return torch.addcmul(bias.to(x.dtype), F.relu(x).square(), scale.to(x.dtype))


def _dense(x: Tensor) -> bool:
    """x's elements fill its storage span exactly once (contiguous in some dim order): an
    elementwise kernel may walk the memory directly and the output may take x's strides."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return True
    expected = 1
    for size, stride in sorted(zip(x.shape, x.stride()), key=lambda t: t[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


@torch.compiler.assume_constant_result
def _decide(backend: str, device_type: str, index: int, dtype: torch.dtype) -> str:
    def refusal():
        if device_type != "cuda":
            return f"the StarReLU kernel runs on CUDA only (x is on {device_type})"
        if dtype not in CUDA_DTYPE_CODES:
            return f"the StarReLU kernel takes float32, float16 or bfloat16 (x is {dtype})"
        return kernel_unavailable_reason(torch.device(device_type, index) if index >= 0 else torch.device(device_type))
    return resolve_fused("star_relu", backend, device_type, refusal, "the PyTorch formula")


def star_relu(x: Tensor, scale: Tensor, bias: Tensor, *, backend: str = "auto") -> Tensor:
    """``scale * relu(x)**2 + bias``.

    Args:
        x: any shape, float32 / float16 / bfloat16.  scale, bias: one element each (any float dtype,
            read as float32).  backend: "auto", "kernel" or "reference" (module docstring).

    Returns:
        x's shape and dtype (and its strides when x is dense); computed in float32. Memory: the
        output; the backward keeps x (not the output). A non-dense or unaligned x is copied once.
    """
    if scale.numel() != 1 or bias.numel() != 1:
        raise ValueError(f"star_relu: scale and bias must have one element each, got {scale.numel()} and {bias.numel()}")
    chosen = _decide(backend, x.device.type, -1 if x.device.index is None else x.device.index, x.dtype)
    if chosen == "reference":
        return star_relu_reference(x, scale, bias)
    s, b = scale.reshape(()).to(torch.float32), bias.reshape(()).to(torch.float32)
    if torch.compiler.is_compiling() or not nothing_intercepts() or not plain_tensors(x, s, b):
        return torch.ops.ssm2d.star_relu_fwd(x, s, b)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, s, b))):
        return _forward(x, s, b)
    return _StarReluFunction.apply(x, s, b)


def _kernel_layout(x: Tensor) -> Tensor:
    """x itself when the kernel can walk its memory (dense, 16-byte aligned), else a contiguous copy."""
    if not _dense(x) or x.data_ptr() % 16:
        x = x.contiguous()
        if x.data_ptr() % 16:
            x = x.clone()
    return x


def _forward(x: Tensor, s: Tensor, b: Tensor) -> Tensor:
    x = _kernel_layout(x)
    y = torch.empty_like(x)  # a dense x's strides
    dev = x.device.index
    s, b = s.contiguous(), b.contiguous()
    compiled().star_relu_forward(x.data_ptr(), y.data_ptr(), x.numel(), s.data_ptr(), b.data_ptr(),
                                 CUDA_DTYPE_CODES[x.dtype], dev, raw_stream(dev))
    return y


def _backward(dy: Tensor, x: Tensor, s: Tensor, need_s: bool, need_b: bool):
    """dx (x's layout and dtype), dscale, dbias (0-dim float32 or None)."""
    x = _kernel_layout(x)
    dy = dy.to(x.dtype)
    if dy.stride() != x.stride() or dy.data_ptr() % 16:  # the kernel walks both memories in the same order
        dy = torch.empty_like(x).copy_(dy)
    dx = torch.empty_like(x)
    ds = torch.empty((), dtype=torch.float32, device=x.device) if need_s else None
    db = torch.empty((), dtype=torch.float32, device=x.device) if need_b else None
    C = compiled()
    code = CUDA_DTYPE_CODES[x.dtype]
    ws = None
    if need_s or need_b:
        ws = torch.empty(C.star_relu_backward_workspace_floats(x.numel(), code), dtype=torch.float32, device=x.device)
    dev = x.device.index
    s = s.contiguous()
    C.star_relu_backward(dy.data_ptr(), x.data_ptr(), dx.data_ptr(), x.numel(), s.data_ptr(),
                         0 if ds is None else ds.data_ptr(), 0 if db is None else db.data_ptr(),
                         0 if ws is None else ws.data_ptr(), code, dev, raw_stream(dev))
    return dx, ds, db


class _StarReluFunction(torch.autograd.Function):
    """The eager kernel path's autograd (the custom ops' forward and backward without the dispatcher)."""

    @staticmethod
    def forward(ctx, x, s, b):
        ctx.save_for_backward(x, s)
        return _forward(x, s, b)

    @staticmethod
    def backward(ctx, dy):
        x, s = ctx.saved_tensors
        refuse_double_backward("star_relu", dy, x, s)
        return _backward(dy, x, s, ctx.needs_input_grad[1], ctx.needs_input_grad[2])


@torch.library.custom_op("ssm2d::star_relu_fwd", mutates_args=())
def star_relu_fwd(x: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    return _forward(x, scale, bias)


@star_relu_fwd.register_fake
def _(x, scale, bias):
    return torch.empty_like(x if _dense(x) else x.contiguous())


@torch.library.custom_op("ssm2d::star_relu_bwd", mutates_args=())
def star_relu_bwd(dy: Tensor, x: Tensor, scale: Tensor, need_s: bool, need_b: bool) -> tuple[Tensor, Tensor, Tensor]:
    dx, ds, db = _backward(dy, x, scale, need_s, need_b)
    zero = x.new_zeros((), dtype=torch.float32)  # a custom op returns tensors: zero for "not asked for"
    return dx, zero if ds is None else ds, zero if db is None else db


@star_relu_bwd.register_fake
def _(dy, x, scale, need_s, need_b):
    return (torch.empty_like(x if _dense(x) else x.contiguous()), x.new_empty((), dtype=torch.float32),
            x.new_empty((), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    x, s, b = inputs
    ctx.save_for_backward(x, s)


def _autograd_backward(ctx, dy):
    x, s = ctx.saved_tensors
    refuse_double_backward("star_relu", dy, x, s)
    need_s, need_b = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    dx, ds, db = torch.ops.ssm2d.star_relu_bwd(dy, x, s, need_s, need_b)
    return dx, (ds if need_s else None), (db if need_b else None)


torch.library.register_autograd("ssm2d::star_relu_fwd", _autograd_backward, setup_context=_setup_context)
