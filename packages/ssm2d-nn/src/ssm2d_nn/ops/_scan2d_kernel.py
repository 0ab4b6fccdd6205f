"""The scan2d kernel calls of the torch ops: descriptors built straight from tensors.

``scan2d`` validates its arguments once per argument layout (``scan2d_plan``), and everything the
kernel calls need that depends only on shapes, strides, dtypes and the device is computed then too:
the ``Frame`` below (sizes, the logical-frame strides and pointer offsets of every operand, buffer
sizes). A call then adds data pointers to the frame's offsets and hands the descriptors to the
compiled kernels without validating again, which keeps the host time of an op call small (the
checked array API of ``ssm2d_kernels.scan2d`` repeats every check for callers that bring their own
arrays). Buffer sizes come from the same C++ functions the kernels use.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ._common import at_layout as at
from ._common import compiled as _kernels
from ._common import contiguous_strides, data_ptr, raw_stream, scratch

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def grid(t: Optional[Tensor], origin: str, order: str, has_state: bool = False):
    """(ptr, sb, sc, sn, si, sj) of a (batch, C[, N], H, W) tensor in the scan's logical frame."""
    if t is None:
        return None
    from ssm2d_kernels.scan2d import grid_descriptor

    return grid_descriptor(t.data_ptr(), t.shape, t.stride(), t.element_size(), origin, order, has_state)


def _layout(shape, strides, itemsize: int, origin: str, order: str, has_state: bool = False) -> tuple:
    """``grid`` at pointer 0: (byte offset, sb, sc, sn, si, sj); ``at`` adds a data pointer."""
    from ssm2d_kernels.scan2d import grid_descriptor

    return grid_descriptor(0, shape, strides, itemsize, origin, order, has_state)


def layout_of(t: Optional[Tensor], origin: str, order: str, has_state: bool = False) -> Optional[tuple]:
    return None if t is None else _layout(t.shape, t.stride(), t.element_size(), origin, order, has_state)


class Frame(NamedTuple):
    """What the kernel calls of one argument layout need beyond the data pointers."""

    problem: dict  # the problem descriptor's fixed entries (sizes, dtype codes, device)
    origin: str
    order: str
    device: int  # CUDA ordinal, -1 for the CPU
    u: tuple  # layouts (byte offset, strides) of the inputs in the logical frame
    delta: tuple
    z: Optional[tuple]
    B: tuple
    C: tuple
    cell: tuple  # a fresh contiguous tensor shaped like u in u's dtype: out, y, du, ddelta, dz
    bc_acc: tuple  # a fresh contiguous (batch, G, N, H, W) accumulator: dB, dC
    carry_floats: int  # float32 values the CUDA forward saves for the backward
    infer_workspace_floats: int  # forward scratch when nothing is saved
    train_workspace_floats: int  # forward scratch when carries are saved
    backward_workspace_floats: int
    keep_y: bool  # the CUDA backward needs the pre-gate output (tiled kernels with z)


def frame(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, z: Optional[Tensor], origin: str,
          order: str, param_dtype: torch.dtype) -> Frame:
    """The frame of validated arguments (A may still be cast to ``param_dtype``: only its shape is read)."""
    from ssm2d_kernels.scan2d import logical_hw

    _C = _kernels()
    b, d, h, w = u.shape
    g, n = B.shape[1], A.shape[1]
    lh, lw = logical_hw(h, w, order)
    device = u.device.index if u.is_cuda else -1
    on_cuda = device >= 0
    sizes = (b, d, n, lh, lw)
    infer_ws = int(_C.scan2d_forward_workspace_floats(*sizes)) if on_cuda else 0
    return Frame(
        problem=dict(batch=b, dim=d, dstate=n, groups=g, height=lh, width=lw, dtype=_DTYPE_CODES[u.dtype],
                     param_dtype=_DTYPE_CODES[param_dtype], device=device),
        origin=origin, order=order, device=device,
        u=layout_of(u, origin, order), delta=layout_of(delta, origin, order), z=layout_of(z, origin, order),
        B=layout_of(B, origin, order, True), C=layout_of(C, origin, order, True),
        cell=_layout(u.shape, contiguous_strides(u.shape), u.element_size(), origin, order),
        bc_acc=_layout(B.shape, contiguous_strides(B.shape), param_dtype.itemsize, origin, order, True),
        carry_floats=int(_C.scan2d_carry_floats(*sizes)) if on_cuda else 0,
        infer_workspace_floats=infer_ws,
        train_workspace_floats=int(_C.scan2d_forward_workspace_floats(*sizes, True)) if on_cuda else 0,
        backward_workspace_floats=int(_C.scan2d_backward_workspace_floats(*sizes)) if on_cuda else 0,
        keep_y=on_cuda and z is not None and bool(_C.scan2d_backward_needs_y(d, g, n)),
    )


def problem(f: Frame, u, delta, A, B, C, D, z, delta_bias, softplus: bool) -> dict:
    """The kernel's problem descriptor. A, D, delta_bias must already be float32 (float64 with
    float64 inputs); D and delta_bias contiguous."""
    return problem_at(f, u, delta, A.data_ptr(), A.stride(), B, C, D, z, delta_bias, softplus)


def problem_at(f: Frame, u, delta, A_ptr: int, A_strides: tuple, B, C, D, z, delta_bias, softplus: bool) -> dict:
    """``problem`` with A given as a data pointer and its (sd, sn) element strides; the other
    operands are tensors, data pointers (ints) or None."""
    sd, sn = A_strides
    return dict(f.problem, softplus=bool(softplus), u=at(u, f.u), delta=at(delta, f.delta), z=at(z, f.z),
                B=at(B, f.B), C=at(C, f.C), A=A_ptr, A_sd=sd, A_sn=sn, D=data_ptr(D), delta_bias=data_ptr(delta_bias),
                stream=raw_stream(f.device))


def forward(f: Frame, u, delta, A, B, C, D, z, delta_bias, softplus: bool,
            save: bool) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """(out, y, carries): ``save`` keeps what the backward needs (CUDA carries, and the pre-gate
    output y where the backward needs it); without it y and carries are None and nothing is saved."""
    out = torch.empty(u.shape, dtype=u.dtype, device=u.device)
    y = torch.empty_like(out) if save and f.keep_y else None
    carries = torch.empty(f.carry_floats, dtype=torch.float32, device=u.device) if save else None
    workspace = scratch(f.train_workspace_floats if save else f.infer_workspace_floats, u)
    _kernels().scan2d_forward(problem(f, u, delta, A, B, C, D, z, delta_bias, softplus),
                              dict(out=at(out, f.cell), y=at(y, f.cell), carries=data_ptr(carries),
                                   workspace=data_ptr(workspace)))
    return out, y, carries


def backward_workspace(f: Frame, u: Tensor) -> Optional[Tensor]:
    return torch.empty(f.backward_workspace_floats, dtype=torch.float32, device=u.device) if f.device >= 0 else None


def backward(f: Frame, prob: dict, *, dout, y, carries, du, ddelta, dz, dB, dC, dA_part, dD_part,
             ddelta_bias_part, deterministic: bool, d_begin: int, d_end: int, workspace,
             bc_layout: Optional[tuple] = None, ddelta_layout: Optional[tuple] = None) -> None:
    """One backward kernel call. ``dout`` is a tensor or its descriptor (``dout_descriptor``). du,
    ddelta, dz are fresh contiguous tensors like u (ddelta in ``ddelta_layout`` when given); dB, dC fresh contiguous accumulators (per-channel partials or
    blocks of a larger buffer when ``bc_layout`` is given: their own layout); every output may be
    given as a data pointer (a block of a larger buffer)."""
    bc = f.bc_acc if bc_layout is None else bc_layout
    _kernels().scan2d_backward(prob, dict(
        dout=dout if isinstance(dout, tuple) else dout_descriptor(f, dout, du), y=at(y, f.cell), carries=data_ptr(carries), du=at(du, f.cell),
        ddelta=at(ddelta, f.cell if ddelta_layout is None else ddelta_layout), dz=at(dz, f.cell), dB=at(dB, bc), dC=at(dC, bc), dA_part=data_ptr(dA_part),
        dD_part=data_ptr(dD_part), ddelta_bias_part=data_ptr(ddelta_bias_part), deterministic=bool(deterministic),
        d_begin=int(d_begin), d_end=int(d_end), workspace=data_ptr(workspace)))


def dout_descriptor(f: Frame, dout: Tensor, like: Tensor) -> tuple:
    """The incoming gradient's descriptor. It is usually contiguous like ``like`` (a tensor shaped
    like u in u's dtype): then its layout is the frame's, and the descriptor costs an addition
    instead of a stride walk."""
    if dout.dtype == like.dtype and dout.shape == like.shape and dout.is_contiguous():
        return at(dout, f.cell)
    return grid(dout, f.origin, f.order)


def carry_floats(u: Tensor, A: Tensor, order: str) -> int:
    """float32 values the CUDA forward saves for the backward (0 on the CPU); the fake kernels' size."""
    from ssm2d_kernels.scan2d import logical_hw

    if not u.is_cuda:
        return 0
    lh, lw = logical_hw(u.shape[-2], u.shape[-1], order)
    return _kernels().scan2d_carry_floats(u.shape[0], u.shape[1], A.shape[1], lh, lw)


def backward_needs_y(A: Tensor, B: Tensor, z: Optional[Tensor]) -> bool:
    """Whether the forward must keep the pre-gate output for the backward (the tiled kernels need it
    when z is given; the band and lanes kernels rebuild it); the fake kernels' answer."""
    return z is not None and bool(_kernels().scan2d_backward_needs_y(A.shape[0], B.shape[1], A.shape[1]))
