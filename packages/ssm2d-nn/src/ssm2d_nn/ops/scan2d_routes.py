"""scan2d_routes: the sum of several scan2d routes (origins / orders) over one input, as one op.

VMamba's SS2D sums four scans of one input that differ in direction and parameters. As separate
``scan2d`` calls each route pays the op's host cost (argument plan, descriptors, allocations, an
autograd node) and the layer pays for splitting its stacked parameters into routes and summing
the outputs and gradients back (views, unbind / stack, adds: a dozen more autograd nodes and as
many kernel launches). Here the routes share one plan, one autograd node and one buffer per
result: the kernels write route k's output into slot k of one buffer (summed once), and the
backward writes each route's ddelta, dB, dC and parameter partials straight into the stacked
gradients. The kernels and their per-route descriptors are scan2d's own (``scan2d_plan``).

Where the eager kernel path does not apply (tracing, fake tensors, dispatch modes, the reference
backend), the op is the plain sum of ``scan2d`` calls over the routes: the same function.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from . import _scan2d_kernel as K
from ._common import (PlanCache, check_tensors, data_ptr, dout_in_dtype, nothing_intercepts, refuse_double_backward,
                      scratch)
from ._scan2d_args import ORDERS, ORIGINS, scan2d_plan
from .scan2d import _run_backward, scan2d
from .scan2d_reference import scan2d_reference

__all__ = ["scan2d_routes", "scan2d_routes_reference"]

# Route slots inside one buffer start on this many bytes: a slot is then aligned like a fresh
# allocation for the kernels' vector loads (carries are read as float4).
_SLOT_ALIGN = 256


def scan2d_routes(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                  delta_bias: Optional[Tensor] = None, delta_softplus: bool = False, *,
                  routes: Sequence[tuple[str, str]], backend: str = "auto",
                  memory_format: torch.memory_format = torch.contiguous_format) -> Tensor:
    """Sum over routes k of ``scan2d(u, delta[:, k], A[k], B[:, k], C[:, k], D[k], None,
    delta_bias[k], delta_softplus, origin=routes[k][0], order=routes[k][1])``.

    Args:
        u: (batch, D, H, W), the input every route scans.
        delta: (batch, K, D, H, W), route k's step before bias and softplus.
        A: (K, D, N).  B, C: (batch, K, G, N, H, W), G dividing D.
        D, delta_bias: (K, D) or None.
        routes: K pairs (origin, order), origin in "tl", "tr", "bl", "br", order "hv" or "vh".
        backend: "auto", "kernel" or "reference", as for scan2d.
        memory_format: the output's layout, ``torch.contiguous_format`` or ``torch.channels_last``
            (written so by the sum of the routes; a LayerNorm over the channels that follows reads a
            channels-last output without a copy).

    Returns:
        (batch, D, H, W) in u's dtype: the routes' outputs (each accumulated in float32, float64 for
        float64 inputs) summed in a float32 (float64) reduction and rounded once.

    Memory (kernel backend): the K route outputs in one buffer while they are summed; for the
    backward, the carries each route's scan2d forward saves (see scan2d). The backward's results
    are the stacked gradients themselves (ddelta like delta, dB / dC like B / C, dA like A), plus K
    per-route du buffers summed into du.
    """
    routes = _check_routes(routes)
    if memory_format not in (torch.contiguous_format, torch.channels_last):
        raise ValueError(f"scan2d_routes: memory_format must be torch.contiguous_format or torch.channels_last, "
                         f"got {memory_format!r}")
    if torch.compiler.is_compiling():
        # Traced: scan2d's custom ops enter the graph, one per route.
        _check_shapes(u, delta, A, B, C, D, delta_bias, len(routes))
        out = _sum_of_calls(scan2d, u, delta, A, B, C, D, delta_bias, delta_softplus, routes, backend)
        return out.contiguous(memory_format=memory_format)
    plan = _routes_plan(u, delta, A, B, C, D, delta_bias, routes, backend)
    if plan is None or not nothing_intercepts():
        out = _sum_of_calls(scan2d, u, delta, A, B, C, D, delta_bias, delta_softplus, routes, backend)
        return out.contiguous(memory_format=memory_format)
    A, D, delta_bias = _params(A, plan.param_dtype), _params(D, plan.param_dtype), _params(delta_bias, plan.param_dtype)
    args = (u, delta, A, B, C, D, delta_bias)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args)):
        return _forward(plan, args, delta_softplus, save=False, memory_format=memory_format)[0]
    return _RoutesFunction.apply(plan, delta_softplus, torch.are_deterministic_algorithms_enabled(), memory_format,
                                 *args)


def scan2d_routes_reference(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, *, routes) -> Tensor:
    """The same sum with :func:`scan2d_reference` per route (pure PyTorch; the test oracle)."""
    routes = _check_routes(routes)
    _check_shapes(u, delta, A, B, C, D, delta_bias, len(routes))
    return _sum_of_calls(lambda *a, backend, **kw: scan2d_reference(*a, **kw), u, delta, A, B, C, D, delta_bias,
                         delta_softplus, routes, "reference")


def _sum_of_calls(fn, u, delta, A, B, C, D, delta_bias, softplus, routes, backend) -> Tensor:
    out = None
    for k, (origin, order) in enumerate(routes):
        y = fn(u, delta[:, k], A[k], B[:, k], C[:, k], None if D is None else D[k], None,
               None if delta_bias is None else delta_bias[k], softplus, origin=origin, order=order, backend=backend)
        out = y if out is None else out + y
    return out


def _check_routes(routes) -> tuple:
    pairs = isinstance(routes, (tuple, list)) and all(
        isinstance(r, (tuple, list)) and len(r) == 2 and all(isinstance(x, str) for x in r) for r in routes)
    if not pairs:
        raise ValueError(f"scan2d_routes: routes must be a sequence of (origin, order) pairs, got {routes!r}")
    routes = tuple(tuple(r) for r in routes)
    if not routes:
        raise ValueError("scan2d_routes: routes must name at least one (origin, order) pair")
    for origin, order in routes:
        if origin not in ORIGINS or order not in ORDERS:
            raise ValueError(f"scan2d_routes: each route must be (origin in {ORIGINS}, order in {ORDERS}), "
                             f"got {(origin, order)}")
    return routes


def _check_shapes(u, delta, A, B, C, D, delta_bias, k: int) -> None:
    """The stacked layout; each route's own checks are scan2d's (run on its views)."""
    check_tensors("scan2d_routes", (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D),
                                    ("delta_bias", delta_bias)))
    if u.dim() != 4:
        raise ValueError(f"scan2d_routes: u must have shape (batch, D, H, W), got {tuple(u.shape)}")
    b, d, h, w = u.shape
    if tuple(delta.shape) != (b, k, d, h, w):
        raise ValueError(f"scan2d_routes: delta must have shape (batch, K, D, H, W) = {(b, k, d, h, w)} for "
                         f"{k} routes, got {tuple(delta.shape)}")
    if A.dim() != 3 or tuple(A.shape[:2]) != (k, d):
        raise ValueError(f"scan2d_routes: A must have shape (K, D, N) with K={k}, D={d}, got {tuple(A.shape)}")
    n = A.shape[2]
    for name, t in (("B", B), ("C", C)):
        if t.dim() != 6 or tuple(t.shape[:2]) != (b, k) or tuple(t.shape[3:]) != (n, h, w):
            raise ValueError(f"scan2d_routes: {name} must have shape (batch, K, G, N, H, W) = {(b, k, 'G', n, h, w)}, "
                             f"got {tuple(t.shape)}")
    g = B.shape[2]
    if C.shape[2] != g or g < 1 or d % g:
        raise ValueError(f"scan2d_routes: B and C must have the same number of groups G dividing D={d}, got "
                         f"B with G={B.shape[2]} and C with G={C.shape[2]}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (k, d):
            raise ValueError(f"scan2d_routes: {name} must have shape (K, D) = {(k, d)}, got {tuple(t.shape)}")


def _params(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """A, D, delta_bias as the kernels read them: ``dtype``, contiguous (a copy only when needed)."""
    if t is None or (t.dtype == dtype and t.is_contiguous()):
        return t
    return t.to(dtype, memory_format=torch.contiguous_format)


class RoutesPlan(NamedTuple):
    """One argument layout of scan2d_routes: each route's scan2d frame and where its operands and
    results sit inside the stacked tensors (byte offsets from their data pointers)."""

    param_dtype: torch.dtype
    frames: tuple  # scan2d frames, one per route
    offsets: tuple  # per route: byte offsets of (delta, A, B, C, D, delta_bias) in the stacked inputs
    A_strides: tuple  # (sd, sn) of every route's A view, in elements
    out_slot: int  # bytes between the route outputs (and the per-route du) in their buffers
    carry_offsets: tuple  # float32 offsets of each route's saved carries in one buffer
    carry_floats: int
    infer_workspace_floats: int  # one scratch buffer serves the routes, which run one after another
    train_workspace_floats: int
    backward_workspace_floats: int
    calls: tuple  # per route: its compiled frame with ddelta / dB / dC in slices of the stacked gradients


def _shifted(layout: tuple, nbytes: int) -> tuple:
    return (layout[0] + nbytes,) + tuple(layout[1:])


def _align(nbytes: int) -> int:
    return -(-nbytes // _SLOT_ALIGN) * _SLOT_ALIGN


def _build(u, delta, A, B, C, D, delta_bias, routes, backend) -> Optional[RoutesPlan]:
    """None when a route would not take scan2d's eager kernel path (reference backend, tensor
    subclasses, ...): the op is then the sum of scan2d calls."""
    _check_shapes(u, delta, A, B, C, D, delta_bias, len(routes))
    pdt = torch.float64 if u.dtype == torch.float64 else torch.float32
    A, D, delta_bias = _params(A, pdt), _params(D, pdt), _params(delta_bias, pdt)
    frames, offsets, calls = [], [], []
    b, k = u.shape[0], len(routes)
    acc = torch.empty((2,) + tuple(B.shape), dtype=pdt, device="meta")
    grad_delta = torch.empty(delta.shape, dtype=u.dtype, device="meta")

    def off(view: Optional[Tensor], whole: Optional[Tensor]) -> int:
        return 0 if view is None else (view.storage_offset() - whole.storage_offset()) * view.element_size()

    for i, (origin, order) in enumerate(routes):
        views = (delta[:, i], A[i], B[:, i], C[:, i], None if D is None else D[i],
                 None if delta_bias is None else delta_bias[i])
        dv, Av, Bv, Cv, Dv, biasv = views
        plan = scan2d_plan(u, dv, Av, Bv, Cv, Dv, None, biasv, origin, order, backend)
        if plan.frame is None:
            return None
        frames.append(plan.frame)
        offsets.append(tuple(off(v, t) for v, t in zip(views, (delta, A, B, C, D, delta_bias))))
        # ddelta, dB and dC of the route: slices of the stacked gradients, their layouts taken from the
        # whole buffers' data pointers (the slice's offset folded into the layout's byte offset).
        dB = acc[0, :, i]
        calls.append(K.compiled_frame(
            plan.frame, ddelta=_shifted(K.layout_of(grad_delta[:, i], origin, order), off(grad_delta[:, i], grad_delta)),
            bc=_shifted(K.layout_of(dB, origin, order, True), off(dB, acc))))
    out_slot = _align(u.numel() * u.element_size())
    carry_offsets, total = [], 0
    for f in frames:
        carry_offsets.append(total)
        total += _align(f.carry_floats * 4) // 4
    return RoutesPlan(pdt, tuple(frames), tuple(offsets), A[0].stride(), out_slot, tuple(carry_offsets), total,
                      max(f.infer_workspace_floats for f in frames), max(f.train_workspace_floats for f in frames),
                      max(f.backward_workspace_floats for f in frames), tuple(calls))


_PLANS = PlanCache(_build)


def _routes_plan(u, delta, A, B, C, D, delta_bias, routes, backend) -> Optional[RoutesPlan]:
    return _PLANS.plan((u, delta, A, B, C, D, delta_bias), (routes, backend))


def _slots(n: int, slot_bytes: int, like: Tensor) -> tuple[Tensor, int]:
    """A buffer of n slots of ``slot_bytes`` each, viewed as (n, *like.shape) with each slot a
    contiguous tensor like ``like``, and its data pointer."""
    step = slot_bytes // like.element_size()
    buf = torch.empty(n * step, dtype=like.dtype, device=like.device)
    b, d, h, w = like.shape
    return buf.as_strided((n, b, d, h, w), (step, d * h * w, h * w, w, 1)), buf.data_ptr()


def _operands(plan: RoutesPlan, args: tuple, softplus: bool) -> list:
    """Each route's operands (``K.operands``): its views' data pointers, computed from the stacked
    tensors' pointers and the plan's offsets (no views made)."""
    u, delta, A, B, C, D, delta_bias = args
    ptrs = (delta.data_ptr(), A.data_ptr(), B.data_ptr(), C.data_ptr(), data_ptr(D), data_ptr(delta_bias))
    ops = []
    for f, offs in zip(plan.frames, plan.offsets):
        p = [None if q is None else q + o for q, o in zip(ptrs, offs)]
        ops.append(K.operands(f, u, p[0], (p[1], plan.A_strides), p[2], p[3], p[4], None, p[5], softplus))
    return ops


def _forward(plan: RoutesPlan, args: tuple, softplus: bool, save: bool,
             memory_format: torch.memory_format = torch.contiguous_format) -> tuple[Tensor, Optional[Tensor]]:
    """(sum of the routes' outputs in ``memory_format``, the routes' carries for the backward or None)."""
    u = args[0]
    k = len(plan.frames)
    ys, y0 = _slots(k, plan.out_slot, u)
    carries = torch.empty(plan.carry_floats, dtype=torch.float32, device=u.device) if save and plan.carry_floats else None
    workspace = scratch(plan.train_workspace_floats if save else plan.infer_workspace_floats, u)
    c0 = data_ptr(carries)
    for i, (f, ops) in enumerate(zip(plan.frames, _operands(plan, args, softplus))):
        K.run(f, ops, y0 + i * plan.out_slot, None, None if c0 is None else c0 + 4 * plan.carry_offsets[i], workspace)
    if k == 1:
        return ys[0].contiguous(memory_format=memory_format), carries  # the slot itself when already so
    # The one pass over the route outputs writes the layout asked for, in u's dtype (accumulated in
    # float32): into a given tensor, since autocast would run a plain sum in float32 and return that.
    out = torch.empty_like(u, memory_format=memory_format)
    torch.sum(ys, dim=0, out=out)
    return out, carries


def _backward(plan: RoutesPlan, dout: Tensor, args: tuple, carries: Optional[Tensor], softplus: bool) -> tuple:
    """(du, ddelta, dA, dB, dC, dD, ddelta_bias) of the stacked inputs; None for absent D, delta_bias."""
    u, delta, A, B, C, D, delta_bias = args
    acc, k = plan.param_dtype, len(plan.frames)
    b, d = u.shape[0], u.shape[1]
    n = A.shape[2]
    dout = dout_in_dtype(dout, u)
    dus, du0 = _slots(k, plan.out_slot, u)
    ddelta = K.fresh_like(delta)
    dBC = torch.zeros((2,) + tuple(B.shape), dtype=acc, device=u.device)  # added into
    # Per-route, per-batch partials: dA (K, b, d, n), then dD (K, b, d), then ddelta_bias (K, b, d);
    # every value is written.
    parts = torch.empty(k * b * d * (n + 2), dtype=acc, device=u.device)
    isz, p0, dd0, q0 = acc.itemsize, parts.data_ptr(), ddelta.data_ptr(), dBC.data_ptr()
    workspace = scratch(plan.backward_workspace_floats, u)
    c0, half = data_ptr(carries), B.numel() * isz
    for i, (f, ops) in enumerate(zip(plan.frames, _operands(plan, args, softplus))):
        # The compiled frame of the route writes ddelta, dB and dC into the stacked gradients' slices.
        K.backward(f, ops, dout=K.dout_argument(f, dout, u), y=None,
                   carries=None if c0 is None else c0 + 4 * plan.carry_offsets[i],
                   du=du0 + i * plan.out_slot, ddelta=dd0, dz=None, dB=q0, dC=q0 + half,
                   dA_part=p0 + i * b * d * n * isz, dD_part=p0 + (k * b * d * n + i * b * d) * isz,
                   ddelta_bias_part=p0 + (k * b * d * (n + 1) + i * b * d) * isz,
                   deterministic=False, d_begin=0, d_end=d, workspace=workspace, call=plan.calls[i])
    dA = parts[: k * b * d * n].view(k, b, d, n).sum(1)
    sums = parts[k * b * d * n:].view(2, k, b, d).sum(2)
    dBC = dBC.to(B.dtype)
    return (dus[0] if k == 1 else dus.sum(0)), ddelta, dA, dBC.select(0, 0), dBC.select(0, 1), \
        (sums.select(0, 0) if D is not None else None), (sums.select(0, 1) if delta_bias is not None else None)


def _backward_deterministic(plan: RoutesPlan, dout: Tensor, args: tuple, carries: Optional[Tensor],
                            softplus: bool) -> tuple:
    """The deterministic backward: scan2d's per route (its per-channel partials of dB / dC, summed
    in channel order), stacked."""
    u, delta, A, B, C, D, delta_bias = args
    grads = []
    for i, f in enumerate(plan.frames):
        route_carries = None
        if carries is not None:
            route_carries = carries.narrow(0, plan.carry_offsets[i], f.carry_floats)
        grads.append(_run_backward(f, dout, u, delta[:, i], A[i], B[:, i], C[:, i], None if D is None else D[i], None,
                                   None if delta_bias is None else delta_bias[i], None, route_carries, softplus, True))
    du = grads[0][0]
    for g in grads[1:]:
        du = du + g[0]
    stack = [torch.stack([g[j] for g in grads], dim=dim) for j, dim in ((1, 1), (2, 0), (3, 1), (4, 1))]
    dD = torch.stack([g[5] for g in grads]) if D is not None else None
    dbias = torch.stack([g[7] for g in grads]) if delta_bias is not None else None
    return (du, *stack, dD, dbias)


class _RoutesFunction(torch.autograd.Function):
    """The eager kernel path's autograd (one node for all routes)."""

    @staticmethod
    def forward(ctx, plan: RoutesPlan, softplus: bool, deterministic: bool, memory_format, u, delta, A, B, C, D,
                delta_bias):
        out, carries = _forward(plan, (u, delta, A, B, C, D, delta_bias), softplus, save=True,
                                memory_format=memory_format)
        ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, carries)
        ctx.plan, ctx.flags = plan, (softplus, deterministic)
        return out

    @staticmethod
    def backward(ctx, dout):
        *args, carries = ctx.saved_tensors
        refuse_double_backward("scan2d_routes", dout, *args)
        softplus, deterministic = ctx.flags
        run = _backward_deterministic if deterministic and dout.is_cuda else _backward
        return (None, None, None, None) + run(ctx.plan, dout, tuple(args), carries, softplus)
