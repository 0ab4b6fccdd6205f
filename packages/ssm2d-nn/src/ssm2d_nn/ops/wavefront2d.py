"""wavefront2d, the Mamba2D (M2D-SSM) scan, as a PyTorch op.

``wavefront2d`` checks its arguments, picks the backend and runs either the compiled kernel (the
``ssm2d::wavefront2d_fwd`` / ``ssm2d::wavefront2d_bwd`` custom ops, with fake implementations for
``torch.compile`` and registered autograd) or the pure-PyTorch reference.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backends
from ._common import add_group_partials, check_devices, check_tensors, stream_of
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

    Memory (kernel backend): the output only; the backward recomputes the states. On CUDA its
    scratch is, for rows of at most 64 cells (N <= 16), batch*ceil(E/16)*256*(ceil(H/8) + 8)*W
    float32 values (row checkpoints every 8 rows and one 8-row segment), else
    batch*E*N*(ceil(H/32) + 32)*W; plus float32 dBT/dBL/dC accumulators. The (batch, H, W, E, N)
    state is never stored.
    """
    _check(u, dT, dL, AT, AL, BT, BL, C, D, origin)
    unsupported = None
    if u.is_cuda and u.dtype == torch.float64:
        unsupported = "the CUDA kernel takes float32, float16 or bfloat16, not float64"
    elif u.is_cuda and min(u.shape[1], u.shape[2]) > 2048:
        unsupported = "the CUDA kernel scans grids with H or W <= 2048"
    which = backends.resolve_backend("wavefront2d", backend, u.device, unsupported=unsupported)
    if which == "reference":
        return wavefront2d_reference(u, dT, dL, AT, AL, BT, BL, C, D, origin=origin)
    pdt = torch.float64 if u.dtype == torch.float64 else torch.float32
    return torch.ops.ssm2d.wavefront2d_fwd(u, dT, dL, AT.to(pdt), AL.to(pdt), BT, BL, C,
                                          None if D is None else D.to(pdt).contiguous(), origin,
                                          torch.are_deterministic_algorithms_enabled())


def _workspace(u: Tensor, AT: Tensor, BT: Tensor, backward: bool) -> Optional[Tensor]:
    if not u.is_cuda:
        return None
    from ssm2d_kernels.wavefront2d import wavefront2d_workspace_floats

    b, h, w, e = u.shape
    groups = 1 if BT.dim() == 4 else BT.shape[3]
    n = wavefront2d_workspace_floats(b, e, AT.shape[1], h, w, u.device.index or 0, backward, groups)
    return torch.empty(n, dtype=torch.float32, device=u.device) if n else None


@torch.library.custom_op("ssm2d::wavefront2d_fwd", mutates_args=())
def wavefront2d_fwd(u: Tensor, dT: Tensor, dL: Tensor, AT: Tensor, AL: Tensor, BT: Tensor, BL: Tensor, C: Tensor,
                    D: Optional[Tensor], origin: str, deterministic: bool) -> Tensor:
    from ssm2d_kernels.wavefront2d import wavefront2d_forward

    acc = torch.zeros(u.shape, dtype=AT.dtype, device=u.device)  # the kernel adds into it
    wavefront2d_forward(u, dT, dL, AT, AL, BT, BL, C, D, out=acc, origin=origin,
                        workspace=_workspace(u, AT, BT, backward=False), stream=stream_of(u))
    return acc.to(u.dtype)


@wavefront2d_fwd.register_fake
def _(u, dT, dL, AT, AL, BT, BL, C, D, origin, deterministic):
    return torch.empty(u.shape, dtype=u.dtype, device=u.device)


def _bn_shape(t: Tensor, groups_axis: int) -> tuple:
    b, h, w = t.shape[:3]
    return (b, h, w, groups_axis, t.shape[-1])


@torch.library.custom_op("ssm2d::wavefront2d_bwd", mutates_args=())
def wavefront2d_bwd(dout: Tensor, u: Tensor, dT: Tensor, dL: Tensor, AT: Tensor, AL: Tensor, BT: Tensor, BL: Tensor,
                    C: Tensor, D: Optional[Tensor], origin: str, deterministic: bool
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(du, ddT, ddL, dAT, dAL, dBT, dBL, dC, dD); dD empty when D is None."""
    from ssm2d_kernels.wavefront2d import wavefront2d_backward

    acc = AT.dtype
    b, h, w, e = u.shape
    n = AT.shape[1]
    g = 1 if BT.dim() == 4 else BT.shape[3]
    cell = lambda: torch.zeros(u.shape, dtype=acc, device=u.device)  # noqa: E731  (added into)
    du, ddT, ddL = cell(), cell(), cell()
    dB = [torch.zeros(_bn_shape(BT, g), dtype=acc, device=u.device) for _ in range(3)]
    dAT_part = torch.empty(b, e, n, dtype=acc, device=u.device)
    dAL_part = torch.empty(b, e, n, dtype=acc, device=u.device)
    dD_part = torch.zeros(b, e, dtype=acc, device=u.device)
    common = dict(du=du, ddT=ddT, ddL=ddL, dAT_part=dAT_part, dAL_part=dAL_part,
                  dD_part=dD_part if D is not None else None, origin=origin,
                  workspace=_workspace(u, AT, BT, backward=True), stream=stream_of(u))
    if deterministic and u.is_cuda:
        # Per-channel partials of dBT/dBL/dC, summed over each group's channels in channel order.
        per_group = e // g
        chunk = max(1, DETERMINISTIC_WORKSPACE_BYTES // (3 * b * h * w * n * 4))
        # Whole groups when they fit, else whole blocks of 16 channels (the short-row kernel's unit).
        chunk = (chunk // per_group) * per_group if chunk >= per_group else max(16, chunk // 16 * 16)
        for e0 in range(0, e, chunk):
            e1 = min(e, e0 + chunk)
            parts = [torch.zeros(b, h, w, e1 - e0, n, dtype=acc, device=u.device) for _ in range(3)]
            wavefront2d_backward(dout, u, dT, dL, AT, AL, BT, BL, C, D, dBT=parts[0], dBL=parts[1], dC=parts[2],
                                 deterministic=True, e_begin=e0, e_end=e1, **common)
            for total, part in zip(dB, parts):
                add_group_partials(total, part, e0, per_group, dim=3)
    else:
        wavefront2d_backward(dout, u, dT, dL, AT, AL, BT, BL, C, D, dBT=dB[0], dBL=dB[1], dC=dB[2], **common)
    shaped = [x.reshape(BT.shape).to(BT.dtype) for x in dB]
    dD = dD_part.sum(0) if D is not None else u.new_empty(0, dtype=acc)
    return (du.to(u.dtype), ddT.to(u.dtype), ddL.to(u.dtype), dAT_part.sum(0), dAL_part.sum(0), shaped[0], shaped[1],
            shaped[2], dD)


@wavefront2d_bwd.register_fake
def _(dout, u, dT, dL, AT, AL, BT, BL, C, D, origin, deterministic):
    like = lambda: torch.empty(u.shape, dtype=u.dtype, device=u.device)  # noqa: E731
    return (like(), like(), like(), torch.empty_like(AT), torch.empty_like(AL), torch.empty_like(BT),
            torch.empty_like(BL), torch.empty_like(C),
            torch.empty(u.shape[3], dtype=AT.dtype, device=u.device) if D is not None
            else u.new_empty(0, dtype=AT.dtype))


def _setup_context(ctx, inputs, output):
    u, dT, dL, AT, AL, BT, BL, C, D, origin, deterministic = inputs
    ctx.save_for_backward(u, dT, dL, AT, AL, BT, BL, C, D)
    ctx.flags = (origin, deterministic)


def _backward(ctx, dout):
    u, dT, dL, AT, AL, BT, BL, C, D = ctx.saved_tensors
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (dout, u, dT, dL, AT, AL, BT, BL, C, D)):
        raise RuntimeError("wavefront2d: double backward (a gradient taken with create_graph=True) is not "
                           "supported by the kernel backend; use backend='reference' for higher-order gradients")
    origin, deterministic = ctx.flags
    du, ddT, ddL, dAT, dAL, dBT, dBL, dC, dD = torch.ops.ssm2d.wavefront2d_bwd(
        dout, u, dT, dL, AT, AL, BT, BL, C, D, origin, deterministic)
    return du, ddT, ddL, dAT, dAL, dBT, dBL, dC, (dD if D is not None else None), None, None


torch.library.register_autograd("ssm2d::wavefront2d_fwd", _backward, setup_context=_setup_context)
