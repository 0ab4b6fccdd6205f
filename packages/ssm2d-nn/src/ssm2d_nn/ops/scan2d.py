"""scan2d, the 2DMamba selective scan, as a PyTorch op.

``scan2d`` checks its arguments, picks the backend and runs either the compiled kernel or the
pure-PyTorch reference. The kernel runs through the ``ssm2d::scan2d_fwd`` / ``ssm2d::scan2d_bwd``
custom ops (with fake implementations so ``torch.compile`` and export trace them, and registered
autograd) wherever something may intercept the call (tracing, fake or meta tensors, tensor
subclasses, dispatch modes, functorch transforms); plain eager calls go straight to the same
kernels through an autograd.Function. The checks, the backend choice and the kernel descriptors'
shape-dependent parts are computed once per argument layout (``scan2d_plan``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _scan2d_kernel as K
from ._common import add_group_partials, dout_in_dtype, nothing_intercepts, refuse_double_backward
from ._scan2d_args import checked_plan, scan2d_plan
from .scan2d_reference import scan2d_reference

__all__ = ["scan2d", "scan2d_reference"]

# Deterministic dB/dC on CUDA sum per-channel partials; this bounds their workspace per chunk.
DETERMINISTIC_WORKSPACE_BYTES = 256 << 20


def scan2d(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
           z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False, *,
           origin: str = "tl", order: str = "hv", backend: str = "auto") -> Tensor:
    """The 2DMamba selective scan: horizontal (along W) then vertical (along H) recurrences.

    Args:
        u, delta: (batch, D, H, W). ``delta`` is the step before ``delta_bias`` and softplus.
        A: (D, N), real (negative in practice).
        B, C: (batch, G, N, H, W); G divides D, channel d uses group d // (D // G).
        D, delta_bias: (D,) or None.  z: (batch, D, H, W) gate or None (output multiplied by silu(z)).
        delta_softplus: dt = softplus(delta + delta_bias) if True, else delta + delta_bias.
        origin: corner the scan starts from, "tl", "tr", "bl" or "br".
        order: "hv" rows first (2DMamba), "vh" columns first.
        backend: "auto", "kernel" or "reference" (see :mod:`ssm2d_nn.backends`).

    Returns:
        (batch, D, H, W) in u's dtype; accumulation in float32 (float64 for float64 inputs).
        A, D and delta_bias are used in float32 (float64 for float64 inputs) whatever their dtype.

    Without a backward to follow (no input requires grad, or grad mode off) the CUDA forward saves
    nothing (no carries, no pre-gate output).

    Memory (kernel backend): the output, plus for the backward, on CUDA: with N == 1 on a grid of at
    most 64 x 64 cells (chan kernels: the short side in a channel's lanes) a quarter of u's element count in
    float32 (the buffer holds the larger of this and the band kernels' layout), none when both sides are
    at most 16 cells (the backward recomputes whole channels); with N < 8 (band kernels)
    the state of every 16th row (N/16 times u's element count in float32, none when the scanned
    H <= 16) and, transiently, for grids wider than one band (up to 128 columns), band summaries of
    about (2N+1)/32 of u's element count per band boundary; with 8 <= N <= 16 and groups of a
    multiple of 8 channels (lanes kernels) the G entering every 16-column strip per row and h every
    16th row (about (1 + N/16) times u's count); otherwise (tiled kernels) per-tile carries (N/16 of
    u's count) and the pre-gate output when z is given. The N-times-larger state is
    never stored. Gradients are exact for every G; on CUDA dB/dC use float32 atomics unless
    ``torch.use_deterministic_algorithms(True)`` is on, which makes them bitwise reproducible
    (per-channel partial sums, at most 256 MiB of workspace per chunk). The CPU kernel is always
    deterministic for a fixed number of threads.
    """
    compiling = torch.compiler.is_compiling()
    if compiling:
        # Traced: the checks run at trace time and the custom ops below enter the graph.
        plan = checked_plan(u, delta, A, B, C, D, z, delta_bias, origin, order, backend)
    else:
        plan = scan2d_plan(u, delta, A, B, C, D, z, delta_bias, origin, order, backend)
    if plan.backend == "reference":
        return scan2d_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus, origin=origin, order=order)
    if plan.cast_params:
        pdt = plan.param_dtype
        A = A.to(pdt)
        D = None if D is None else D.to(pdt).contiguous()  # the kernels read D[d], delta_bias[d]
        delta_bias = None if delta_bias is None else delta_bias.to(pdt).contiguous()
    needs_backward = _needs_backward(u, delta, A, B, C, D, z, delta_bias)
    if plan.frame is not None and not compiling and nothing_intercepts():
        # Eager: straight to the kernel (the dispatcher's custom-op layers cost more host time than
        # the rest of the call); the same kernels and autograd as the custom ops below.
        if not needs_backward:
            return K.forward(plan.frame, u, delta, A, B, C, D, z, delta_bias, delta_softplus, save=False)[0]
        return _Scan2dFunction.apply(plan.frame, delta_softplus, torch.are_deterministic_algorithms_enabled(),
                                     u, delta, A, B, C, D, z, delta_bias)
    if u.is_cuda and not needs_backward:
        # No backward will run: nothing to save.
        return torch.ops.ssm2d.scan2d_infer(u, delta, A, B, C, D, z, delta_bias, delta_softplus, origin, order)
    out, _, _ = torch.ops.ssm2d.scan2d_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, origin, order,
                                           torch.are_deterministic_algorithms_enabled())
    return out


def _needs_backward(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _frame(u, delta, A, B, C, D, z, delta_bias, origin, order) -> K.Frame:
    """The kernel frame inside the custom ops (arguments already checked; cached like any call)."""
    return scan2d_plan(u, delta, A, B, C, D, z, delta_bias, origin, order, "kernel").frame


@torch.library.custom_op("ssm2d::scan2d_infer", mutates_args=())
def scan2d_infer(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                 z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool, origin: str,
                 order: str) -> Tensor:
    """Kernel forward when no backward follows (CUDA): the output only; nothing is saved (no
    carries, no pre-gate y). Not differentiable."""
    f = _frame(u, delta, A, B, C, D, z, delta_bias, origin, order)
    return K.forward(f, u, delta, A, B, C, D, z, delta_bias, delta_softplus, save=False)[0]


@scan2d_infer.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, origin, order):
    return torch.empty(u.shape, dtype=u.dtype, device=u.device)


def _empty(t: Tensor, dtype=None) -> Tensor:
    return t.new_empty(0, dtype=dtype)


@torch.library.custom_op("ssm2d::scan2d_fwd", mutates_args=())
def scan2d_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
               delta_bias: Optional[Tensor], delta_softplus: bool, origin: str, order: str,
               deterministic: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Kernel forward: (out, the pre-gate output when the CUDA backward needs it (tiled kernels, with
    z) else empty, CUDA carries or empty)."""
    f = _frame(u, delta, A, B, C, D, z, delta_bias, origin, order)
    out, y, carries = K.forward(f, u, delta, A, B, C, D, z, delta_bias, delta_softplus, save=True)
    return out, _empty(u) if y is None else y, carries


@scan2d_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, origin, order, deterministic):
    out = torch.empty(u.shape, dtype=u.dtype, device=u.device)
    y = torch.empty_like(out) if u.is_cuda and K.backward_needs_y(A, B, z) else _empty(u)
    return out, y, torch.empty(K.carry_floats(u, A, order), dtype=torch.float32, device=u.device)


def _run_backward(f: K.Frame, dout: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                  D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor], y: Optional[Tensor],
                  carries: Optional[Tensor], delta_softplus: bool, deterministic: bool) -> tuple:
    """(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias); None for absent D, z, delta_bias. dA, dD and
    ddelta_bias are views of one tensor, and so are dB and dC."""
    acc = A.dtype
    b, d, h, w = u.shape
    g, n = B.shape[1], A.shape[1]
    dout = dout_in_dtype(dout, u)
    du, ddelta = K.fresh_like(u), K.fresh_like(u)
    dz = K.fresh_like(u) if z is not None else None
    # The per-batch partials of dA (b, d, n), dD (b, d) and ddelta_bias (b, d) in one buffer, one after
    # the other; the kernel takes each as a pointer to a contiguous block (passed as pointers: no views
    # to make). Every cell is written.
    parts = torch.empty(b * d * (n + 2), dtype=acc, device=u.device)
    p0, isz = parts.data_ptr(), parts.element_size()
    ops = K.operands(f, u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    common = dict(dout=K.dout_argument(f, dout, du), y=y, carries=carries, du=du, ddelta=ddelta, dz=dz, dA_part=p0,
                  dD_part=p0 + b * d * n * isz, ddelta_bias_part=p0 + b * d * (n + 1) * isz,
                  workspace=K.backward_workspace(f, u))
    # dB and dC in one zeroed buffer (added into: atomics, partials, the CPU kernel), cast once at the
    # end; each half is a fresh contiguous (batch, G, N, H, W) block, the frame's accumulator layout.
    dBC = torch.zeros((2,) + tuple(B.shape), dtype=acc, device=u.device)
    if deterministic and u.is_cuda:
        # Per-channel partials of dB/dC, summed over each group's channels in a fixed order; chunks of
        # whole groups (or of one group's channels) keep the workspace under the budget.
        per_group = d // g
        per_channel_bytes = 2 * b * n * h * w * 4
        chunk = max(1, DETERMINISTIC_WORKSPACE_BYTES // per_channel_bytes)
        chunk = (chunk // per_group) * per_group if chunk >= per_group else max(1, chunk)
        for d0 in range(0, d, chunk):
            d1 = min(d, d0 + chunk)
            pBC = torch.empty(2, b, d1 - d0, n, h, w, dtype=acc, device=u.device)  # every cell is written
            pB, pC = pBC.unbind(0)
            K.backward(f, ops, dB=pB, dC=pC, deterministic=True, d_begin=d0, d_end=d1,
                       bc_layout=K.layout_of(pB, f.origin, f.order, True), **common)
            add_group_partials(dBC, pBC, d0, per_group, dim=2)
    else:
        q0 = dBC.data_ptr()
        K.backward(f, ops, dB=q0, dC=q0 + B.numel() * isz, deterministic=False, d_begin=0, d_end=d, **common)
    if n == 1:
        # dA_part is then (b, d) too: the three partials are one (3, b, d) tensor and one sum.
        sums = parts.view(3, b, d).sum(1)
        dA, i = sums.select(0, 0).view(d, 1), 1
    else:
        dA = parts[: b * d * n].view(b, d, n).sum(0)
        sums, i = parts[b * d * n:].view(2, b, d).sum(1), 0
    # Pieces by select (one cheap view each; unbind costs more host time than the two or three selects).
    dD = sums.select(0, i) if D is not None else None
    dbias = sums.select(0, i + 1) if delta_bias is not None else None
    dBC = dBC.to(B.dtype)  # B and C have u's dtype (checked)
    return du, ddelta, dA, dBC.select(0, 0), dBC.select(0, 1), dD, dz, dbias


@torch.library.custom_op("ssm2d::scan2d_bwd", mutates_args=())
def scan2d_bwd(dout: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
               z: Optional[Tensor], delta_bias: Optional[Tensor], y: Tensor, carries: Tensor, delta_softplus: bool,
               origin: str, order: str, deterministic: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                                       Tensor, Tensor]:
    """Kernel backward: (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias); empty for absent D, z, delta_bias."""
    f = _frame(u, delta, A, B, C, D, z, delta_bias, origin, order)
    du, ddelta, dA, dB, dC, dD, dz, dbias = _run_backward(f, dout, u, delta, A, B, C, D, z, delta_bias,
                                                          y if y.numel() else None, carries if u.is_cuda else None,
                                                          delta_softplus, deterministic)
    # A custom op's outputs may not share storage; _run_backward's dA / dD / ddelta_bias and dB / dC
    # are views of one buffer each (the eager path keeps them so, this traced path copies them). Its
    # schema has no optional outputs: empty tensors stand for the absent ones.
    acc = A.dtype
    return (du, ddelta, dA, dB, dC.clone(), _empty(u, acc) if dD is None else dD.clone(),
            _empty(u) if dz is None else dz, _empty(u, acc) if dbias is None else dbias.clone())


@scan2d_bwd.register_fake
def _(dout, u, delta, A, B, C, D, z, delta_bias, y, carries, delta_softplus, origin, order, deterministic):
    acc = A.dtype
    like = lambda: torch.empty(u.shape, dtype=u.dtype, device=u.device)  # noqa: E731
    return (like(), like(), torch.empty(A.shape, dtype=acc, device=u.device), torch.empty_like(B),
            torch.empty_like(C), torch.empty(u.shape[1], dtype=acc, device=u.device) if D is not None else _empty(u, acc),
            like() if z is not None else _empty(u),
            torch.empty(u.shape[1], dtype=acc, device=u.device) if delta_bias is not None else _empty(u, acc))


class _Scan2dFunction(torch.autograd.Function):
    """The eager kernel path's autograd: the custom ops' forward and backward without the dispatcher."""

    @staticmethod
    def forward(ctx, f: K.Frame, softplus: bool, deterministic: bool, u, delta, A, B, C, D, z, delta_bias):
        out, y, carries = K.forward(f, u, delta, A, B, C, D, z, delta_bias, softplus, save=True)
        # y and carries are intermediates: saved like the inputs, so they are freed after the backward.
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, y, carries if u.is_cuda else None)
        ctx.frame, ctx.flags = f, (softplus, deterministic)
        return out

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, B, C, D, z, delta_bias, y, carries = ctx.saved_tensors
        refuse_double_backward("scan2d", dout, u, delta, A, B, C, D, z, delta_bias)
        softplus, deterministic = ctx.flags
        du, ddelta, dA, dB, dC, dD, dz, dbias = _run_backward(ctx.frame, dout, u, delta, A, B, C, D, z, delta_bias,
                                                              y, carries, softplus, deterministic)
        return None, None, None, du, ddelta, dA, dB, dC, dD, dz, dbias


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, softplus, origin, order, deterministic = inputs
    _, y, carries = output
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, y, carries)
    ctx.flags = (softplus, origin, order, deterministic)


def _backward(ctx, dout, _dy, _dcarries):
    u, delta, A, B, C, D, z, delta_bias, y, carries = ctx.saved_tensors
    refuse_double_backward("scan2d", dout, u, delta, A, B, C, D, z, delta_bias)
    softplus, origin, order, deterministic = ctx.flags
    du, ddelta, dA, dB, dC, dD, dz, dbias = torch.ops.ssm2d.scan2d_bwd(
        dout, u, delta, A, B, C, D, z, delta_bias, y, carries, softplus, origin, order, deterministic)
    return (du, ddelta, dA, dB, dC, dD if D is not None else None, dz if z is not None else None,
            dbias if delta_bias is not None else None, None, None, None, None)


torch.library.register_autograd("ssm2d::scan2d_fwd", _backward, setup_context=_setup_context)
