"""The wavefront2d kernel calls of the torch ops: a compiled frame per argument layout, pointers per call.

The array API of ``ssm2d_kernels.wavefront2d`` checks every operand and maps it onto the kernel's
scanned frame (origin flips, the transpose of rows longer than the CUDA kernel takes, T and L
exchanged with it) on every call. The ops run that mapping once per argument layout, on the
first call's tensors, and keep what depends only on the layout: every operand's byte offset from
its tensor's data pointer and its strides, which operand fills which slot, the sizes of the scratch
buffers, held on the compiled side as a ``Wave2dFrame``. A call then passes data pointers (ints).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ._common import at_layout as _at
from ._common import compiled as _kernels
from ._common import contiguous_strides, raw_stream, scratch

def cuda_refusal(height: int, width: int, dim: int, dstate: int, groups: int = 1) -> Optional[str]:
    """Why the CUDA kernels cannot scan this grid, or None (also when the kernels are not installed:
    the backend resolution says that)."""
    try:
        from ssm2d_kernels.wavefront2d import cuda_refusal as refusal
    except ImportError:
        return None
    return refusal(height, width, dim, dstate, groups)


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
    dout: tuple  # layout of an incoming gradient contiguous like u (u's dtype) in the scanned frame
    out_in_dtype: bool  # CUDA lane kernels: out, du, ddT, ddL written once in u's dtype (no accumulators)
    call: object  # the compiled frame (_C.Wave2dFrame)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _contiguous(shape, dtype: torch.dtype, chk) -> object:
    """An Array stand-in at pointer 0 for a fresh contiguous tensor: its layout in the scanned frame."""
    from ssm2d_kernels._arrays import Array

    return Array(0, tuple(shape), contiguous_strides(shape), _dtype_name(dtype), chk.device)


def frame(args: tuple, origin: str, acc_dtype: torch.dtype) -> Frame:
    """The frame of checked arguments (u, dT, dL, AT, AL, BT, BL, C, D), AT, AL and D already in
    ``acc_dtype`` and D contiguous. Runs the kernels' own checks and mapping once."""
    from ssm2d_kernels.wavefront2d import _Checked, lanes_fit, wavefront2d_workspace_floats

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
    cell_acc = chk.grid(_contiguous(u.shape, acc_dtype, chk), "x")
    bn_acc = chk.grid(_contiguous((b, h, w, g, n), acc_dtype, chk), "bn")
    like_u = chk.grid(_contiguous(u.shape, u.dtype, chk), "x")  # dout, and the output in u's dtype
    call = _kernels().Wave2dFrame(fixed, *(layout for _, _, layout in slots), cell_acc, bn_acc, like_u)
    return Frame(
        problem=fixed, slots=slots, params=params, checked=chk, cell_acc=cell_acc, bn_acc=bn_acc,
        grads=(chk.tl("ddT", "ddL"), chk.tl("dBT", "dBL"), chk.tl("dAT_part", "dAL_part")),
        device=chk.device, acc_dtype=acc_dtype,
        forward_workspace_floats=wavefront2d_workspace_floats(*sizes, backward=False, groups=g),
        backward_workspace_floats=wavefront2d_workspace_floats(*sizes, backward=True, groups=g),
        dout=like_u, out_in_dtype=chk.device >= 0 and lanes_fit(e, n, g), call=call,
    )


def operands(f: Frame, args: tuple) -> tuple:
    """A call's inputs as the compiled calls take them: the grid operands' data pointers in slot
    order (u, dT, dL, BT, BL, C as scanned), AT and AL (pointer, sd, sn) likewise, D (0: none), and
    the stream."""
    (_, it), (_, il) = f.params
    AT, AL, D = args[it], args[il], args[8]
    return tuple(args[i].data_ptr() for _, i, _ in f.slots) + (
        AT.data_ptr(), *AT.stride(), AL.data_ptr(), *AL.stride(), 0 if D is None else D.data_ptr(),
        raw_stream(f.device))


def _layout(f: Frame, t: Tensor, kind: str) -> tuple:
    """The scanned-frame descriptor of a tensor whose layout the frame did not precompute."""
    from ssm2d_kernels._arrays import Array

    return f.checked.grid(Array(t.data_ptr(), tuple(t.shape), t.stride(), _dtype_name(t.dtype), f.device), kind)


def forward(f: Frame, args: tuple) -> Tensor:
    """The output in u's dtype (accumulated in the parameters' dtype). The CUDA lane kernels write it
    directly; the other kernels add into a zeroed accumulator (state chunks), cast at the end."""
    u = args[0]
    workspace = scratch(f.forward_workspace_floats, u)
    direct = f.out_in_dtype
    # else a zeroed accumulator the kernel adds into
    out = (torch.empty if direct else torch.zeros)(u.shape, dtype=u.dtype if direct else f.acc_dtype, device=u.device)
    _kernels().wavefront2d_forward_at(f.call, *operands(f, args), _ptr(workspace), out.data_ptr(), direct)
    return out.to(u.dtype)  # no copy where the kernel wrote u's dtype


def _ptr(t) -> int:
    if t is None:
        return 0
    return t if isinstance(t, int) else t.data_ptr()


def backward(f: Frame, dout: Tensor, args: tuple, *, du, ddT, ddL, dBT, dBL, dC, dAT_part, dAL_part, dD_part,
             deterministic: bool = False, e_begin: int = 0, e_end: int = -1, per_channel: bool = False,
             cells_in_dtype: bool = False) -> None:
    """One backward kernel call; du, ddT, ddL fresh contiguous accumulators (float32, added into), or
    with ``cells_in_dtype`` (``f.out_in_dtype`` frames) fresh contiguous blocks in u's dtype that the
    lane kernels write; dBT, dBL, dC fresh contiguous accumulators (or per-channel partials with
    ``per_channel``: their layout computed here, so tensors then). Results may be given as data
    pointers (blocks of a larger buffer)."""
    u = args[0]
    named = dict(ddT=ddT, ddL=ddL, dBT=dBT, dBL=dBL, dAT_part=dAT_part, dAL_part=dAL_part)
    (dt, dl), (bt, bl), (at_, al) = f.grads
    bn = (lambda t: _layout(f, t, "bn")) if per_channel else _ptr
    like_u = dout.dtype == u.dtype and dout.shape == u.shape and dout.is_contiguous()
    workspace = scratch(f.backward_workspace_floats, u)
    _kernels().wavefront2d_backward_at(
        f.call, *operands(f, args), _ptr(workspace), _at(dout, f.dout) if like_u else _layout(f, dout, "x"),
        _ptr(du), _ptr(named[dt]), _ptr(named[dl]), bn(named[bt]), bn(named[bl]), bn(dC), _ptr(named[at_]),
        _ptr(named[al]), _ptr(dD_part), bool(deterministic), int(e_begin), int(e_end if e_end >= 0 else u.shape[3]),
        bool(cells_in_dtype))
