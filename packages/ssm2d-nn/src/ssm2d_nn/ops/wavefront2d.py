"""wavefront2d, the Mamba2D (M2D-SSM) scan, as a PyTorch op.

``wavefront2d`` checks its arguments, picks the backend and runs either the compiled kernel or the
pure-PyTorch reference. Like ``scan2d``: the checks, the backend choice and the kernel frame are
computed once per argument layout; plain eager calls go straight to the kernels through an
autograd.Function, and the ``ssm2d::wavefront2d_fwd`` / ``ssm2d::wavefront2d_bwd`` custom ops (with
fake implementations for ``torch.compile`` and registered autograd) run wherever something may
intercept the call.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import backends
from . import _wavefront2d_kernel as K
from ._common import (OpPlan, PlanCache, add_group_partials, check_devices, check_tensors, dout_in_dtype,
                      nothing_intercepts, plain_tensors, refuse_double_backward)
from .wavefront2d_reference import ORIGINS, wavefront2d_reference

__all__ = ["wavefront2d", "wavefront2d_reference"]

DETERMINISTIC_WORKSPACE_BYTES = 256 << 20


def _check(u, dT, dL, AT, AL, BT, BL, C, D, origin):
    named = (("u", u), ("dT", dT), ("dL", dL), ("AT", AT), ("AL", AL), ("BT", BT), ("BL", BL), ("C", C), ("D", D))
    check_tensors("wavefront2d", named)
    if origin not in ORIGINS:
        raise ValueError(f"wavefront2d: origin must be one of {ORIGINS}, got {origin!r}")
    if u.dim() != 4:
        raise ValueError(f"wavefront2d: u must have shape (batch, H, W, E), got {tuple(u.shape)}")
    b, h, w, e = u.shape
    if h < 1 or w < 1:
        raise ValueError(f"wavefront2d: u must have H >= 1 and W >= 1, got H={h}, W={w}")
    for name, t in (("dT", dT), ("dL", dL)):
        if t.shape != u.shape:
            raise ValueError(f"wavefront2d: {name} must have shape (batch, H, W, E) = {tuple(u.shape)}, got {tuple(t.shape)}")
    if AT.dim() != 2 or AT.shape[0] != e:
        raise ValueError(f"wavefront2d: AT must have shape (E, N) with E={e}, got {tuple(AT.shape)}")
    n = AT.shape[1]
    if AL.shape != AT.shape:
        raise ValueError(f"wavefront2d: AL must have shape (E, N) = {tuple(AT.shape)} like AT, got {tuple(AL.shape)}")
    groups = None
    for name, t in (("BT", BT), ("BL", BL), ("C", C)):
        g = 1 if t.dim() == 4 else (t.shape[3] if t.dim() == 5 else None)
        ok = g is not None and g >= 1 and e % g == 0 and tuple(t.shape) == ((b, h, w, n) if t.dim() == 4 else (b, h, w, g, n))
        if not ok:
            raise ValueError(f"wavefront2d: {name} must have shape (batch, H, W, N) = {(b, h, w, n)} or "
                             f"(batch, H, W, G, N) with G dividing E={e}, got {tuple(t.shape)}")
        if groups is not None and (t.dim(), g) != groups:
            raise ValueError(f"wavefront2d: BT, BL and C must have the same layout, {name} differs")
        groups = (t.dim(), g)
    if D is not None and tuple(D.shape) != (e,):
        raise ValueError(f"wavefront2d: D must have shape (E,) = ({e},), got {tuple(D.shape)}")
    for name, t in (("dT", dT), ("dL", dL), ("BT", BT), ("BL", BL), ("C", C)):
        if t.dtype != u.dtype:
            raise TypeError(f"wavefront2d: {name} must have the dtype of u ({u.dtype}), got {t.dtype}")
    check_devices("wavefront2d", named[1:], u)


def wavefront2d(u: Tensor, dT: Tensor, dL: Tensor, AT: Tensor, AL: Tensor, BT: Tensor, BL: Tensor, C: Tensor,
                D: Optional[Tensor] = None, *, origin: str = "tl", backend: str = "auto") -> Tensor:
    """The Mamba2D scan: each cell from its left and top neighbours (averaged in the interior).

    Args:
        u, dT, dL: (batch, H, W, E), channels last; dT, dL the already-positive step sizes.
        AT, AL: (E, N).  BT, BL, C: (batch, H, W, N), or (batch, H, W, G, N) with G dividing E.
        D: (E,) or None.  origin: "tl" (default), "tr", "bl" or "br" (M2D's odd blocks use "br").
        backend: "auto", "kernel" or "reference" (see :mod:`ssm2d_nn.backends`).

    Returns:
        (batch, H, W, E) in u's dtype, accumulated in float32 (float64 for float64 inputs).

    Memory (kernel backend): the output only is kept; the backward recomputes the states. On CUDA
    the forward's transient scratch, when it runs column strips (N <= 16, long rows or few
    blocks), is batch*ceil(E/16)*(strips - 1)*H*256 float32 carries; the backward's is, with
    N <= 16, batch*ceil(E/16)*256*(ceil(H/K) + K)*W float32 values (row checkpoints every K rows
    and one K-row segment, K = 8 up to 128 rows, else about sqrt(H/2); in column strips each strip
    rounded up to the strip width) plus, in column strips, the forward's carries, for at most
    256 MiB of it per launch where the channels can be split (they then run in chunks of 16-channel
    blocks: at 1024 x 1024, B = 1, E = 64, two of 32 channels); else batch*E*N*(ceil(H/32) + 32)*W;
    plus float32 dBT/dBL/dC accumulators. With N <= 16 on CUDA (G = 1 or groups of a multiple of 16
    channels) the output and du, ddT, ddL are written once in u's dtype; otherwise (and on the
    CPU) they are float32 accumulators cast at the end. The (batch, H, W, E, N) state is never
    stored.
    """
    args = (u, dT, dL, AT, AL, BT, BL, C, D)
    compiling = torch.compiler.is_compiling()
    plan = _checked_plan(*args, origin, backend) if compiling else _plan(*args, origin, backend)
    if plan.backend == "reference":
        return wavefront2d_reference(*args, origin=origin)
    if plan.cast_params:
        pdt = plan.param_dtype
        AT, AL, D = AT.to(pdt), AL.to(pdt), None if D is None else D.to(pdt).contiguous()
        args = (u, dT, dL, AT, AL, BT, BL, C, D)
    deterministic = torch.are_deterministic_algorithms_enabled()
    if plan.frame is not None and not compiling and nothing_intercepts():
        # Eager: straight to the kernels (see scan2d).
        if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args)):
            return K.forward(plan.frame, args)
        return _Wavefront2dFunction.apply(plan.frame, deterministic, *args)
    return torch.ops.ssm2d.wavefront2d_fwd(*args, origin, deterministic)


def _checked_plan(u, dT, dL, AT, AL, BT, BL, C, D, origin, backend) -> OpPlan:
    """The plan without a kernel frame (all that runs while torch.compile traces)."""
    _check(u, dT, dL, AT, AL, BT, BL, C, D, origin)
    unsupported = None
    if u.is_cuda and u.dtype == torch.float64:
        unsupported = "the CUDA kernel takes float32, float16 or bfloat16, not float64"
    elif u.is_cuda:
        unsupported = K.cuda_refusal(u.shape[1], u.shape[2], u.shape[3], AT.shape[1], 1 if BT.dim() == 4 else BT.shape[3])
    which = backends.resolve_backend("wavefront2d", backend, u.device, unsupported=unsupported)
    pdt = torch.float64 if u.dtype == torch.float64 else torch.float32
    cast = AT.dtype != pdt or AL.dtype != pdt or (D is not None and (D.dtype != pdt or not D.is_contiguous()))
    return OpPlan(which, pdt, cast)


def _build_plan(u, dT, dL, AT, AL, BT, BL, C, D, origin, backend) -> OpPlan:
    plan = _checked_plan(u, dT, dL, AT, AL, BT, BL, C, D, origin, backend)
    if plan.backend == "kernel" and plain_tensors(u, dT, dL, AT, AL, BT, BL, C, D):
        # The kernels' mapping checks the parameters as the calls will pass them: cast.
        pdt = plan.param_dtype
        AT, AL, D = AT.to(pdt), AL.to(pdt), None if D is None else D.to(pdt).contiguous()
        plan = plan._replace(frame=K.frame((u, dT, dL, AT, AL, BT, BL, C, D), origin, pdt))
    return plan


_PLANS = PlanCache(_build_plan)


def _plan(u, dT, dL, AT, AL, BT, BL, C, D, origin, backend) -> OpPlan:
    """The checked plan of a call, cached per argument layout (see scan2d_plan)."""
    return _PLANS.plan((u, dT, dL, AT, AL, BT, BL, C, D), (origin, backend))


def _frame(args: tuple, origin: str) -> K.Frame:
    """The kernel frame inside the custom ops (arguments already checked and cast; cached)."""
    return _plan(*args, origin, "kernel").frame


@torch.library.custom_op("ssm2d::wavefront2d_fwd", mutates_args=())
def wavefront2d_fwd(u: Tensor, dT: Tensor, dL: Tensor, AT: Tensor, AL: Tensor, BT: Tensor, BL: Tensor, C: Tensor,
                    D: Optional[Tensor], origin: str, deterministic: bool) -> Tensor:
    args = (u, dT, dL, AT, AL, BT, BL, C, D)
    return K.forward(_frame(args, origin), args)


@wavefront2d_fwd.register_fake
def _(u, dT, dL, AT, AL, BT, BL, C, D, origin, deterministic):
    return torch.empty(u.shape, dtype=u.dtype, device=u.device)


def _bn_shape(t: Tensor, groups_axis: int) -> tuple:
    b, h, w = t.shape[:3]
    return (b, h, w, groups_axis, t.shape[-1])


def _run_backward(f: K.Frame, dout: Tensor, args: tuple, deterministic: bool) -> tuple:
    """(du, ddT, ddL, dAT, dAL, dBT, dBL, dC, dD); dD None when D is None. Views of one tensor each:
    (du, ddT, ddL), (dAT, dAL; with N = 1 dD too), (dBT, dBL, dC)."""
    u, dT, dL, AT, AL, BT, BL, C, D = args
    acc = AT.dtype
    b, h, w, e = u.shape
    dout = dout_in_dtype(dout, u)  # read in u's dtype by every call below
    n = AT.shape[1]
    g = 1 if BT.dim() == 4 else BT.shape[3]
    # du, ddT, ddL in one buffer, each third a fresh contiguous block shaped like u: in u's dtype,
    # written once, where the CUDA lane kernels run (f.out_in_dtype: one thread per cell and channel);
    # else zeroed accumulators the kernel adds into (state chunks), cast once at the end. dBT, dBL,
    # dC: one zeroed accumulator of blocks shaped (batch, H, W, G, N) (16-channel blocks share a
    # cell's states: float32 atomics). The blocks go to the kernel as data pointers (no views to make).
    isz = acc.itemsize
    direct = f.out_in_dtype
    cells = (torch.empty if direct else torch.zeros)((3,) + tuple(u.shape), dtype=u.dtype if direct else acc,
                                                      device=u.device)
    c0, cstep = cells.data_ptr(), u.numel() * cells.element_size()
    bn_shape = _bn_shape(BT, g)
    bn = torch.zeros((3,) + bn_shape, dtype=acc, device=u.device)
    # The per-batch partials of dAT and dAL (b, e, n) and of dD (b, e) one after the other (the kernel
    # takes each as a pointer to a contiguous block).
    parts = torch.zeros(b * e * (2 * n + 1), dtype=acc, device=u.device)
    p0 = parts.data_ptr()
    common = dict(du=c0, ddT=c0 + cstep, ddL=c0 + 2 * cstep, dAT_part=p0, dAL_part=p0 + b * e * n * isz,
                  dD_part=p0 + 2 * b * e * n * isz if D is not None else None, cells_in_dtype=direct)
    if deterministic and u.is_cuda:
        # Per-channel partials of dBT/dBL/dC, summed over each group's channels in channel order.
        per_group = e // g
        chunk = max(1, DETERMINISTIC_WORKSPACE_BYTES // (3 * b * h * w * n * 4))
        # Whole groups when they fit, else whole blocks of 16 channels (the short-row kernel's unit).
        chunk = (chunk // per_group) * per_group if chunk >= per_group else max(16, chunk // 16 * 16)
        for e0 in range(0, e, chunk):
            e1 = min(e, e0 + chunk)
            chunk_parts = torch.zeros(3, b, h, w, e1 - e0, n, dtype=acc, device=u.device)
            pBT, pBL, pC = chunk_parts.unbind(0)
            K.backward(f, dout, args, dBT=pBT, dBL=pBL, dC=pC, deterministic=True, e_begin=e0,
                       e_end=e1, per_channel=True, **common)
            add_group_partials(bn, chunk_parts, e0, per_group, dim=4)
    else:
        b0, bstep = bn.data_ptr(), math.prod(bn_shape) * isz
        K.backward(f, dout, args, dBT=b0, dBL=b0 + bstep, dC=b0 + 2 * bstep, **common)
    # Pieces by select (one cheap view each; unbind costs more host time than the selects).
    bn = bn.to(BT.dtype).view((3,) + tuple(BT.shape))  # BL and C: BT's shape and dtype
    cells = cells.to(u.dtype)  # no copy where the kernel wrote them in u's dtype
    if n == 1:
        sums = parts.view(3, b, e, 1).sum(1)
        dAT, dAL = sums.select(0, 0), sums.select(0, 1)
        dD = sums.select(0, 2).view(e) if D is not None else None
    else:
        sums = parts[: 2 * b * e * n].view(2, b, e, n).sum(1)
        dAT, dAL = sums.select(0, 0), sums.select(0, 1)
        dD = parts[2 * b * e * n:].view(b, e).sum(0) if D is not None else None
    return (cells.select(0, 0), cells.select(0, 1), cells.select(0, 2), dAT, dAL, bn.select(0, 0), bn.select(0, 1),
            bn.select(0, 2), dD)


@torch.library.custom_op("ssm2d::wavefront2d_bwd", mutates_args=())
def wavefront2d_bwd(dout: Tensor, u: Tensor, dT: Tensor, dL: Tensor, AT: Tensor, AL: Tensor, BT: Tensor, BL: Tensor,
                    C: Tensor, D: Optional[Tensor], origin: str, deterministic: bool
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(du, ddT, ddL, dAT, dAL, dBT, dBL, dC, dD); dD empty when D is None."""
    args = (u, dT, dL, AT, AL, BT, BL, C, D)
    du, ddT, ddL, dAT, dAL, dBT, dBL, dC, dD = _run_backward(_frame(args, origin), dout, args, deterministic)
    # A custom op's outputs may not share storage; _run_backward returns views of one buffer for
    # (du, ddT, ddL), (dAT, dAL[, dD]) and (dBT, dBL, dC) (the eager path keeps them so).
    # dD: an empty tensor when D is None (the schema has no optional outputs).
    return (du, ddT.clone(), ddL.clone(), dAT, dAL.clone(), dBT, dBL.clone(), dC.clone(),
            u.new_empty(0, dtype=AT.dtype) if dD is None else dD.clone())


@wavefront2d_bwd.register_fake
def _(dout, u, dT, dL, AT, AL, BT, BL, C, D, origin, deterministic):
    like = lambda: torch.empty(u.shape, dtype=u.dtype, device=u.device)  # noqa: E731
    return (like(), like(), like(), torch.empty_like(AT), torch.empty_like(AL), torch.empty_like(BT),
            torch.empty_like(BL), torch.empty_like(C),
            torch.empty(u.shape[3], dtype=AT.dtype, device=u.device) if D is not None
            else u.new_empty(0, dtype=AT.dtype))


class _Wavefront2dFunction(torch.autograd.Function):
    """The eager kernel path's autograd: the custom ops' forward and backward without the dispatcher."""

    @staticmethod
    def forward(ctx, f: K.Frame, deterministic: bool, *args):
        ctx.save_for_backward(*args)
        ctx.frame, ctx.deterministic = f, deterministic
        return K.forward(f, args)

    @staticmethod
    def backward(ctx, dout):
        args = ctx.saved_tensors
        refuse_double_backward("wavefront2d", dout, *args)
        grads = _run_backward(ctx.frame, dout, args, ctx.deterministic)
        return (None, None) + grads[:8] + (grads[8] if args[8] is not None else None,)


def _setup_context(ctx, inputs, output):
    u, dT, dL, AT, AL, BT, BL, C, D, origin, deterministic = inputs
    ctx.save_for_backward(u, dT, dL, AT, AL, BT, BL, C, D)
    ctx.flags = (origin, deterministic)


def _backward(ctx, dout):
    u, dT, dL, AT, AL, BT, BL, C, D = ctx.saved_tensors
    refuse_double_backward("wavefront2d", dout, u, dT, dL, AT, AL, BT, BL, C, D)
    origin, deterministic = ctx.flags
    du, ddT, ddL, dAT, dAL, dBT, dBL, dC, dD = torch.ops.ssm2d.wavefront2d_bwd(
        dout, u, dT, dL, AT, AL, BT, BL, C, D, origin, deterministic)
    return du, ddT, ddL, dAT, dAL, dBT, dBL, dC, (dD if D is not None else None), None, None


torch.library.register_autograd("ssm2d::wavefront2d_fwd", _backward, setup_context=_setup_context)
