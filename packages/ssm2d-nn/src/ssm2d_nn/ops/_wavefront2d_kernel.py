"""The wavefront2d kernel calls of the torch ops: descriptors from a frame computed once per layout.

The array API of ``ssm2d_kernels.wavefront2d`` checks every operand and maps it onto the kernel's
scanned frame (origin flips, the transpose of rows longer than the CUDA kernel takes, T and L
exchanged with it) on every call. The ops run that mapping once per argument layout, on the
first call's tensors, and keep what depends only on the layout: every descriptor's byte offset from
its tensor's data pointer and its strides, which operand fills which slot, the sizes of the scratch
buffers. A call then adds data pointers and calls the compiled kernels.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ._common import at_layout as _at
from ._common import compiled as _kernels
from ._common import contiguous_strides, data_ptr, raw_stream, scratch

# Operands of the problem descriptor in argument order (u, dT, dL, AT, AL, BT, BL, C, D).
_INPUTS = ("u", "dT", "dL", "AT", "AL", "BT", "BL", "C", "D")
_GRIDS = ("u", "dT", "dL", "BT", "BL", "C")  # grid descriptors; AT, AL, D are plain pointers


class Frame(NamedTuple):
    problem: dict  # the fixed entries of the problem descriptor (sizes, dtypes, states per block, device)
    slots: tuple  # per grid slot of the problem: (slot, argument index, layout after the pointer)
    params: tuple  # (slot, argument index) of AT / AL (exchanged when the grid is scanned transposed)
    checked: object  # the kernels' checked operands of the first call: their frame mapping
    cell_acc: tuple  # layout of a fresh contiguous accumulator shaped like u: out, du, ddT, ddL
    bn_acc: tuple  # layout of a fresh contiguous (batch, H, W, G, N) accumulator: dBT, dBL, dC
    grads: tuple  # (ddT, ddL), (dBT, dBL), (dAT_part, dAL_part) slot names in the scanned frame
    device: int
    acc_dtype: torch.dtype
    forward_workspace_floats: int
    backward_workspace_floats: int


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _contiguous(shape, dtype: torch.dtype, chk) -> object:
    """An Array stand-in at pointer 0 for a fresh contiguous tensor: its layout in the scanned frame."""
    from ssm2d_kernels._arrays import Array

    return Array(0, tuple(shape), contiguous_strides(shape), _dtype_name(dtype), chk.device)


def frame(args: tuple, origin: str, acc_dtype: torch.dtype) -> Frame:
    """The frame of checked arguments (u, dT, dL, AT, AL, BT, BL, C, D), AT, AL and D already in
    ``acc_dtype`` and D contiguous. Runs the kernels' own checks and mapping once."""
    from ssm2d_kernels.wavefront2d import _Checked, wavefront2d_workspace_floats

    chk = _Checked(*args, origin)
    prob = chk.problem(0)
    by_name = dict(zip(_INPUTS, args))
    sources = {"u": "u", "C": "C"}
    sources.update(zip(("dT", "dL"), chk.tl("dT", "dL")))
    sources.update(zip(("BT", "BL"), chk.tl("BT", "BL")))
    slots = tuple((slot, _INPUTS.index(sources[slot]),
                   (prob[slot][0] - by_name[sources[slot]].data_ptr(),) + tuple(prob[slot][1:])) for slot in _GRIDS)
    params = tuple(zip(("AT", "AL"), (_INPUTS.index(n) for n in chk.tl("AT", "AL"))))
    fixed = {k: v for k, v in prob.items() if k not in _GRIDS + ("AT", "AL", "D", "workspace", "stream")}
    u = args[0]
    b, h, w, e = u.shape
    g, n = chk.g, chk.n
    sizes = (b, e, n, h, w, chk.device)
    return Frame(
        problem=fixed, slots=slots, params=params, checked=chk,
        cell_acc=chk.grid(_contiguous(u.shape, acc_dtype, chk), "x"),
        bn_acc=chk.grid(_contiguous((b, h, w, g, n), acc_dtype, chk), "bn"),
        grads=(chk.tl("ddT", "ddL"), chk.tl("dBT", "dBL"), chk.tl("dAT_part", "dAL_part")),
        device=chk.device, acc_dtype=acc_dtype,
        forward_workspace_floats=wavefront2d_workspace_floats(*sizes, backward=False, groups=g),
        backward_workspace_floats=wavefront2d_workspace_floats(*sizes, backward=True, groups=g),
    )


def problem(f: Frame, args: tuple, workspace: Optional[Tensor]) -> dict:
    prob = dict(f.problem, stream=raw_stream(f.device), workspace=data_ptr(workspace), D=data_ptr(args[8]))
    for slot, i, layout in f.slots:
        prob[slot] = _at(args[i], layout)
    for slot, i in f.params:
        t = args[i]
        prob[slot] = t.data_ptr()
        prob[slot + "_sd"], prob[slot + "_sn"] = t.stride()
    return prob


def _layout(f: Frame, t: Tensor, kind: str) -> tuple:
    """The scanned-frame descriptor of a tensor whose layout the frame did not precompute."""
    from ssm2d_kernels._arrays import Array

    return f.checked.grid(Array(t.data_ptr(), tuple(t.shape), t.stride(), _dtype_name(t.dtype), f.device), kind)


def forward(f: Frame, args: tuple) -> Tensor:
    """The output in u's dtype (accumulated in the parameters' dtype)."""
    u = args[0]
    acc = torch.zeros(u.shape, dtype=f.acc_dtype, device=u.device)  # the kernel adds into it
    workspace = scratch(f.forward_workspace_floats, u)
    _kernels().wavefront2d_forward(problem(f, args, workspace), _at(acc, f.cell_acc))
    return acc.to(u.dtype)


def backward(f: Frame, dout: Tensor, args: tuple, *, du, ddT, ddL, dBT, dBL, dC, dAT_part, dAL_part, dD_part,
             deterministic: bool = False, e_begin: int = 0, e_end: int = -1, per_channel: bool = False) -> None:
    """One backward kernel call; du, ddT, ddL fresh contiguous accumulators, dBT, dBL, dC too (or
    per-channel partials with ``per_channel``: their layout computed here, so tensors then). The
    accumulators and partials may be given as data pointers (blocks of a larger buffer)."""
    u = args[0]
    named = dict(ddT=ddT, ddL=ddL, dBT=dBT, dBL=dBL, dAT_part=dAT_part, dAL_part=dAL_part)
    (dt, dl), (bt, bl), (at_, al) = f.grads
    bn = (lambda t: _layout(f, t, "bn")) if per_channel else (lambda t: _at(t, f.bn_acc))
    workspace = scratch(f.backward_workspace_floats, u)
    _kernels().wavefront2d_backward(problem(f, args, None), dict(
        dout=_layout(f, dout, "x"), du=_at(du, f.cell_acc), ddT=_at(named[dt], f.cell_acc),
        ddL=_at(named[dl], f.cell_acc), dBT=bn(named[bt]), dBL=bn(named[bl]), dC=bn(dC),
        dAT_part=data_ptr(named[at_]), dAL_part=data_ptr(named[al]), dD_part=data_ptr(dD_part),
        deterministic=bool(deterministic), e_begin=int(e_begin), e_end=int(e_end if e_end >= 0 else u.shape[3]),
        workspace=data_ptr(workspace)))
