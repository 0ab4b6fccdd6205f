"""The scan2d kernel calls of the torch ops: a compiled frame per argument layout, pointers per call.

``scan2d`` validates its arguments once per argument layout (``scan2d_plan``), and everything the
kernel calls need that depends only on shapes, strides, dtypes and the device is computed then too:
the ``Frame`` below (sizes, the logical-frame strides and byte offsets of every operand and result,
buffer sizes), held on the compiled side as a ``Scan2dFrame``. A call then passes the data pointers
(ints) to the compiled kernels, which add them to the frame's offsets without validating again:
no descriptor dicts to build or parse, which keeps the host time of an op call small (the checked
array API of ``ssm2d_kernels.scan2d`` repeats every check for callers that bring their own arrays).
Buffer sizes come from the same C++ functions the kernels use.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ._common import compiled as _kernels
from ._common import contiguous_strides, raw_stream, scratch

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
    call: object  # the compiled frame (_C.Scan2dFrame): the problem and these layouts, pointers added per call


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
    problem = dict(batch=b, dim=d, dstate=n, groups=g, height=lh, width=lw, dtype=_DTYPE_CODES[u.dtype],
                   param_dtype=_DTYPE_CODES[param_dtype], device=device)
    layouts = dict(u=layout_of(u, origin, order), delta=layout_of(delta, origin, order), z=layout_of(z, origin, order),
                   B=layout_of(B, origin, order, True), C=layout_of(C, origin, order, True),
                   cell=_layout(u.shape, contiguous_strides(u.shape), u.element_size(), origin, order),
                   bc_acc=_layout(B.shape, contiguous_strides(B.shape), param_dtype.itemsize, origin, order, True))
    f = Frame(
        problem=problem, origin=origin, order=order, device=device, **layouts,
        carry_floats=int(_C.scan2d_carry_floats(*sizes)) if on_cuda else 0,
        infer_workspace_floats=infer_ws,
        train_workspace_floats=int(_C.scan2d_forward_workspace_floats(*sizes, True)) if on_cuda else 0,
        backward_workspace_floats=int(_C.scan2d_backward_workspace_floats(*sizes)) if on_cuda else 0,
        keep_y=on_cuda and z is not None and bool(_C.scan2d_backward_needs_y(d, g, n)),
        call=None,
    )
    return f._replace(call=compiled_frame(f))


def compiled_frame(f: Frame, ddelta: Optional[tuple] = None, bc: Optional[tuple] = None):
    """The frame on the compiled side; ``ddelta`` / ``bc``: layouts of ddelta and of the dB / dC
    accumulators other than the frame's fresh contiguous ones (slices of stacked gradients)."""
    return _kernels().Scan2dFrame(f.problem, f.u, f.delta, f.z, f.B, f.C, f.cell, f.cell if ddelta is None else ddelta,
                                  f.bc_acc if bc is None else bc)


def fresh_like(t: Tensor) -> Tensor:
    """An uninitialised contiguous tensor shaped like t in t's dtype (``empty_like`` parses its
    arguments in half the host time of ``torch.empty(shape, dtype=, device=)``)."""
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _ptr(t) -> int:
    """A kernel argument's data pointer: 0 for None; an int is already a pointer."""
    if t is None:
        return 0
    return t if isinstance(t, int) else t.data_ptr()


def operands(f: Frame, u, delta, A, B, C, D, z, delta_bias, softplus: bool) -> tuple:
    """A call's inputs as the compiled calls take them: data pointers (0 for None; ints pass through)
    in the order u, delta, z, B, C, A, A's (sd, sn) strides, D, delta_bias, then softplus and the
    stream. A, D, delta_bias must already be float32 (float64 with float64 inputs); D and delta_bias
    contiguous. ``A`` may be (pointer, (sd, sn))."""
    a_ptr, (sd, sn) = A if isinstance(A, tuple) else (A.data_ptr(), A.stride())
    return (_ptr(u), _ptr(delta), _ptr(z), _ptr(B), _ptr(C), a_ptr, sd, sn, _ptr(D), _ptr(delta_bias), bool(softplus),
            raw_stream(f.device))


def forward(f: Frame, u, delta, A, B, C, D, z, delta_bias, softplus: bool,
            save: bool) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """(out, y, carries): ``save`` keeps what the backward needs (CUDA carries, and the pre-gate
    output y where the backward needs it); without it y and carries are None and nothing is saved."""
    out = fresh_like(u)
    y = torch.empty_like(out) if save and f.keep_y else None
    carries = torch.empty(f.carry_floats, dtype=torch.float32, device=u.device) if save else None
    workspace = scratch(f.train_workspace_floats if save else f.infer_workspace_floats, u)
    run(f, operands(f, u, delta, A, B, C, D, z, delta_bias, softplus), out, y, carries, workspace)
    return out, y, carries


def run(f: Frame, ops: tuple, out, y, carries, workspace, call=None) -> None:
    """One forward kernel call: ``ops`` from ``operands``; out, y tensors or pointers in the cell
    layout; ``call`` a compiled frame other than f's (other result layouts)."""
    _kernels().scan2d_forward_at(f.call if call is None else call, *ops, _ptr(out), _ptr(y), _ptr(carries),
                                 _ptr(workspace))


def backward_workspace(f: Frame, u: Tensor) -> Optional[Tensor]:
    return torch.empty(f.backward_workspace_floats, dtype=torch.float32, device=u.device) if f.device >= 0 else None


def backward(f: Frame, ops: tuple, *, dout, y, carries, du, ddelta, dz, dB, dC, dA_part, dD_part,
             ddelta_bias_part, deterministic: bool, d_begin: int, d_end: int, workspace,
             bc_layout: Optional[tuple] = None, call=None) -> None:
    """One backward kernel call; ``ops`` from ``operands``. ``dout`` is a tensor or its argument
    (``dout_argument``). du, dz are fresh contiguous tensors like u, ddelta too unless ``call`` (a
    compiled frame other than f's) says otherwise; dB, dC fresh contiguous accumulators, or with
    ``bc_layout`` per-channel partials in that layout (or ``call``'s layout); every result may be
    given as a data pointer (a block of a larger buffer)."""
    if not isinstance(dout, (int, tuple)):
        dout = dout_argument(f, dout, du)
    _kernels().scan2d_backward_at(
        f.call if call is None else call, *ops, dout, _ptr(y), _ptr(carries), _ptr(du), _ptr(ddelta), _ptr(dz),
        _ptr(dB), _ptr(dC), bc_layout, _ptr(dA_part), _ptr(dD_part), _ptr(ddelta_bias_part), bool(deterministic),
        int(d_begin), int(d_end), _ptr(workspace))


def dout_argument(f: Frame, dout: Tensor, like: Tensor):
    """The incoming gradient as the compiled backward takes it, ``dout`` already in ``like``'s dtype
    (``_common.dout_in_dtype``). It is usually contiguous like ``like`` (a tensor shaped like u in
    u's dtype): then its layout is the frame's cell layout and its data pointer is enough; otherwise
    its grid descriptor (pointer and strides)."""
    if dout.dtype != like.dtype:
        raise TypeError(f"scan2d backward: dout is {dout.dtype} but the kernels read it as {like.dtype} "
                        "(convert it with _common.dout_in_dtype first)")
    if dout.shape == like.shape and dout.is_contiguous():
        return dout.data_ptr()
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
