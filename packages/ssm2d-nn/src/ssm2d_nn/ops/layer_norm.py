"""LayerNorm over the last dim: the ssm2d-kernels CUDA kernel for channels-last rows, else PyTorch's.

The models' norms run over the channels of channels-last maps: many short rows (32 to 512
elements). PyTorch's CUDA LayerNorm launches a block per row and leaves most of its threads idle
there (measured on an H200: 173 us per norm at M2D-T's shapes, a third of its inference step). The
ssm2d-kernels kernel gives each row a few lanes of a warp (see csrc/cuda/layer_norm.cu).

Backends (``backend=``): "kernel" (CUDA, raises when the call does not fit: say why), "reference"
(``torch.nn.functional.layer_norm``, which is also what the CPU runs) and "auto" (the kernel when it
fits, else PyTorch's; which one runs is logged once per reason at INFO level on the "ssm2d_nn"
logger). Both compute in float32 and return x's dtype. Under torch.compile "auto" leaves the norm to
inductor (it generates and fuses its own) and "kernel" checks the row when the graph runs (the row
length may be symbolic while tracing).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backends import check_backend_name, kernel_unavailable_reason, resolve_fused
from ._common import CUDA_DTYPE_CODES, compiled, nothing_intercepts, plain_tensors, raw_stream, refuse_double_backward

__all__ = ["layer_norm", "layer_norm_kernel_refusal", "row_layout"]


def layer_norm_kernel_refusal(x: Tensor, normalized_shape: Sequence[int]) -> Optional[str]:
    """Why the CUDA kernel cannot normalize ``x`` over ``normalized_shape`` (a sentence), or None."""
    return _refusal(x.device.type, -1 if x.device.index is None else x.device.index, x.dtype,
                    int(x.shape[-1]) if x.dim() else 0, len(tuple(normalized_shape)), tuple(normalized_shape))


def _refusal(device_type: str, index: int, dtype: torch.dtype, cols: int, nd: int, shape: tuple) -> Optional[str]:
    if device_type != "cuda":
        return f"the LayerNorm kernel runs on CUDA only (x is on {device_type})"
    if nd != 1:
        return f"the LayerNorm kernel normalizes the last dim only (normalized_shape {shape})"
    code = CUDA_DTYPE_CODES.get(dtype)
    if code is None:
        return f"the LayerNorm kernel takes float32, float16 or bfloat16 (x is {dtype})"
    reason = kernel_unavailable_reason(torch.device(device_type, index) if index >= 0 else torch.device(device_type))
    if reason is not None:
        return reason
    vec, limit = 16 // dtype.itemsize, _max_cols(code)
    if cols < 1 or cols % vec or cols > limit:
        return f"the LayerNorm kernel takes rows of a multiple of {vec} and at most {limit} {dtype} elements (got {cols})"
    return None


_MAX_COLS: dict = {}


def _max_cols(code: int) -> int:
    if code not in _MAX_COLS:
        _MAX_COLS[code] = compiled().layer_norm_max_cols(code)
    return _MAX_COLS[code]


def _choose(backend: str, x: Tensor, normalized_shape: tuple) -> str:
    if torch.compiler.is_compiling():
        # Traced: inductor generates (and fuses) the norm itself, so "auto" leaves it PyTorch's; and
        # the row length may be symbolic here, so "kernel" defers its checks to the custom op's run.
        check_backend_name("layer_norm", backend)
        return "kernel" if backend == "kernel" else "reference"
    return _decide(backend, x.device.type, -1 if x.device.index is None else x.device.index, x.dtype,
                   int(x.shape[-1]) if x.dim() else 0, len(normalized_shape), normalized_shape)


@torch.compiler.assume_constant_result
def _decide(backend: str, device_type: str, index: int, dtype: torch.dtype, cols: int, nd: int, shape: tuple) -> str:
    # Depends only on the installation, the device and the row shape: under torch.compile it is
    # decided once while tracing; eager calls look the decision up.
    key = (backend, device_type, index, dtype, cols, nd, shape)
    chosen = _DECIDED.get(key)
    if chosen is None:
        chosen = _decide_once(backend, device_type, index, dtype, cols, nd, shape)
        if len(_DECIDED) > 4096:
            _DECIDED.clear()
        _DECIDED[key] = chosen
    return chosen


_DECIDED: dict = {}


def _decide_once(backend: str, device_type: str, index: int, dtype: torch.dtype, cols: int, nd: int, shape: tuple) -> str:
    return resolve_fused("layer_norm", backend, device_type, lambda: _refusal(device_type, index, dtype, cols, nd, shape),
                         "torch.nn.functional.layer_norm")


def layer_norm(x: Tensor, normalized_shape: Sequence[int], weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5, *, backend: str = "auto") -> Tensor:
    """``torch.nn.functional.layer_norm`` over the last dim, by the CUDA kernel where it fits.

    Args:
        x: (..., C), float32 / float16 / bfloat16.  normalized_shape: (C,).
        weight, bias: (C,) or None, any float dtype (read as float32).  eps: added to the variance.
        backend: "auto", "kernel" or "reference" (module docstring).

    Returns:
        (..., C) in x's dtype; mean and variance (biased) in float32, the variance as the mean of
        (x - mean)^2. Memory (kernel): the output plus 8 bytes per row saved for the backward
        (mean, 1/std). x is read in place when its leading dims collapse to two strided ones (any
        contiguous tensor, or e.g. the q half of a (batch, L, 2, heads, head_dim) tensor), else
        copied once (as PyTorch's kernel copies every non-contiguous x).
    """
    normalized_shape = tuple(normalized_shape)
    if _choose(backend, x, normalized_shape) == "reference":
        # PyTorch's kernel wants the parameters in x's dtype (float32 ones under autocast are cast).
        w = None if weight is None or weight.dtype == x.dtype else weight.to(x.dtype)
        b = None if bias is None or bias.dtype == x.dtype else bias.to(x.dtype)
        return F.layer_norm(x, normalized_shape, weight if w is None else w, bias if b is None else b, eps)
    if weight is not None and weight.shape != normalized_shape:
        raise ValueError(f"layer_norm: weight must have shape {normalized_shape}, got {tuple(weight.shape)}")
    if bias is not None and bias.shape != normalized_shape:
        raise ValueError(f"layer_norm: bias must have shape {normalized_shape}, got {tuple(bias.shape)}")
    w = None if weight is None else weight.to(torch.float32)
    b = None if bias is None else bias.to(torch.float32)
    if torch.compiler.is_compiling() or not nothing_intercepts() or not plain_tensors(x, w, b):
        return torch.ops.ssm2d.layer_norm_fwd(x, w, b, float(eps))[0]
    w = None if w is None else w.contiguous()
    b = None if b is None else b.contiguous()
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w, b))):
        return _forward(x, w, b, float(eps), save=False)[0]
    return _LayerNormFunction.apply(x, w, b, float(eps))


def row_layout(x: Tensor) -> Optional[tuple]:
    """(x_inner, x_rs, x_gs) placing the rows of x's last dim as the kernel reads them (row r at
    (r // x_inner) * x_gs + (r % x_inner) * x_rs elements), or None when x's leading dims do not
    collapse to two strided ones or its rows are not on 16-byte boundaries (then x is copied)."""
    key = (x.shape, x.stride(), x.element_size())
    layout = _LAYOUTS.get(key, False)
    if layout is False:  # derived once per shape and strides (a call's Python time matters: 70+ norms a step)
        if len(_LAYOUTS) > 4096:
            _LAYOUTS.clear()
        layout = _LAYOUTS[key] = _strided_rows(x.shape, x.stride(), 16 // x.element_size())
    if layout is None or x.data_ptr() % 16:
        return None
    return layout


_LAYOUTS: dict = {}


def _strided_rows(shape, strides, vec: int) -> Optional[tuple]:
    if strides[-1] != 1 and shape[-1] != 1:
        return None
    merged: list = []  # (size, stride) from the innermost leading dim out, contiguous runs merged
    for size, st in zip(reversed(shape[:-1]), reversed(strides[:-1])):
        if size == 1:
            continue
        if merged and merged[-1][0] * merged[-1][1] == st:
            merged[-1] = (merged[-1][0] * size, merged[-1][1])
        else:
            merged.append((size, st))
    if len(merged) > 2:
        return None
    if not merged:
        layout = (1, 0, 0)
    elif len(merged) == 1:
        layout = (merged[0][0], merged[0][1], 0)
    else:
        layout = (merged[0][0], merged[0][1], merged[1][1])
    if layout[1] % vec or layout[2] % vec:
        return None
    return layout


def _as_rows(x: Tensor) -> tuple:
    """x (or its contiguous copy) and its row layout for the kernel."""
    layout = row_layout(x)
    if layout is None:
        x = x.contiguous()
        if x.data_ptr() % 16:  # an offset view: realigned by a copy
            x = x.clone()
        layout = row_layout(x)
    return x, layout


def _forward(x: Tensor, w: Optional[Tensor], b: Optional[Tensor], eps: float, save: bool):
    """y (contiguous), mean, rstd of x (mean / rstd None unless save). x is read in place where its
    rows allow (row_layout), else copied once."""
    cols = x.shape[-1]
    rows = x.numel() // cols if cols else 0
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    mean = torch.empty(rows, dtype=torch.float32, device=x.device) if save else None
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device) if save else None
    x, (inner, rs, gs) = _as_rows(x)
    dev = x.device.index
    compiled().layer_norm_forward(
        x.data_ptr(), inner, rs, gs, y.data_ptr(), cols, 0 if w is None else w.data_ptr(),
        0 if b is None else b.data_ptr(), 0 if mean is None else mean.data_ptr(),
        0 if rstd is None else rstd.data_ptr(), rows, cols, CUDA_DTYPE_CODES[x.dtype], eps, dev, raw_stream(dev))
    return y, mean, rstd


def _backward(dy: Tensor, x: Tensor, w: Optional[Tensor], mean: Tensor, rstd: Tensor, need_w: bool, need_b: bool):
    """dx (x's dtype, contiguous), dweight, dbias (float32, None unless asked for)."""
    cols = x.shape[-1]
    rows = x.numel() // cols if cols else 0
    dy = dy.to(x.dtype).contiguous()
    if dy.data_ptr() % 16:
        dy = dy.clone()
    x, (inner, rs, gs) = _as_rows(x)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dw = torch.empty(cols, dtype=torch.float32, device=x.device) if need_w else None
    db = torch.empty(cols, dtype=torch.float32, device=x.device) if need_b else None
    C = compiled()
    code = CUDA_DTYPE_CODES[x.dtype]
    ws = None
    if need_w or need_b:
        ws = torch.empty(C.layer_norm_backward_workspace_floats(rows, cols, code), dtype=torch.float32, device=x.device)
    dev = x.device.index
    C.layer_norm_backward(
        dy.data_ptr(), cols, x.data_ptr(), inner, rs, gs, 0 if w is None else w.data_ptr(), mean.data_ptr(),
        rstd.data_ptr(),
        dx.data_ptr(), cols, 0 if dw is None else dw.data_ptr(), 0 if db is None else db.data_ptr(),
        0 if ws is None else ws.data_ptr(), rows, cols, code, dev, raw_stream(dev))
    return dx, dw, db


class _LayerNormFunction(torch.autograd.Function):
    """The eager kernel path's autograd (the custom ops' forward and backward without the dispatcher)."""

    @staticmethod
    def forward(ctx, x, w, b, eps):
        y, mean, rstd = _forward(x, w, b, eps, save=True)
        ctx.save_for_backward(x, w, mean, rstd)
        ctx.has_b = b is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, mean, rstd = ctx.saved_tensors
        refuse_double_backward("layer_norm", dy, x, w)
        need_w = w is not None and ctx.needs_input_grad[1]
        need_b = ctx.has_b and ctx.needs_input_grad[2]
        return _backward(dy, x, w, mean, rstd, need_w, need_b) + (None,)


@torch.library.custom_op("ssm2d::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor, Tensor]:
    # Reached with backend="kernel" under torch.compile, whose trace could not check the row: the
    # cached decision raises, saying why, where the kernel cannot take it.
    _choose("kernel", x, (x.shape[-1],) if x.dim() else ())
    return _forward(x, None if weight is None else weight.contiguous(), None if bias is None else bias.contiguous(),
                    eps, save=True)


@layer_norm_fwd.register_fake
def _(x, weight, bias, eps):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32))


@torch.library.custom_op("ssm2d::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor, need_w: bool,
                   need_b: bool) -> tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = _backward(dy, x, None if weight is None else weight.contiguous(), mean, rstd,
                           need_w, need_b)
    empty = x.new_empty(0, dtype=torch.float32)  # a custom op returns tensors: empty for "not asked for"
    return dx, empty if dw is None else dw, empty if db is None else db


@layer_norm_bwd.register_fake
def _(dy, x, weight, mean, rstd, need_w, need_b):
    cols = x.shape[-1]
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(cols if need_w else 0, dtype=torch.float32), x.new_empty(cols if need_b else 0, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_b = bias is not None
    ctx.mark_non_differentiable(mean, rstd)


def _autograd_backward(ctx, dy, _dmean, _drstd):
    x, w, mean, rstd = ctx.saved_tensors
    refuse_double_backward("layer_norm", dy, x, w)
    need_w = w is not None and ctx.needs_input_grad[1]
    need_b = ctx.has_b and ctx.needs_input_grad[2]
    dx, dw, db = torch.ops.ssm2d.layer_norm_bwd(dy, x, w, mean, rstd, need_w, need_b)
    return dx, (dw if need_w else None), (db if need_b else None), None


torch.library.register_autograd("ssm2d::layer_norm_fwd", _autograd_backward, setup_context=_setup_context)
