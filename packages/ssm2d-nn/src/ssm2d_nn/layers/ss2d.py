"""SS2D, the selective-scan mixer of VMamba v2 ("v05_noz", channel-first), with 1D or 2D routes.

The module maps (B, C, H, W) to (B, C, H, W):

    x  = SiLU(dwconv3x3(in_proj(x)))                      in_proj: 1x1, C -> d_inner, no gate branch
    for each route k of K = 4:
        [dt_r, B_k, C_k] = x_proj[k] x                     per position: (R + 2N) values
        delta_k = dt_proj[k] dt_r                           (d_inner values), bias added in the scan
        y_k = selective scan of x along route k, dt = softplus(delta_k + dt_bias[k]), A_k, D_k
    y = out_proj(LayerNorm2d(sum_k y_k))

``scan="cross1d"`` (VMamba): the routes are 1D scans over the H*W positions in row-major order,
column-major order and both reversed (Mamba's selective scan, i.e. ``scan2d`` on a 1 x (H*W) grid).
``scan="2d"`` (2DVMamba): the routes are the 2D scans of 2DMamba from the top-left rows first,
top-left columns first, bottom-right rows first and bottom-right columns first (SCANS.md section 1).
Both modes have exactly the same parameters, with the released names and shapes, so one checkpoint
layout serves both.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .conv1x1 import Conv1x1, batched_gemm, block_diagonal, conv1x1, grouped_1x1
from .norms import LayerNorm2d, _as_dtype

from ..ops import scan2d_reference, scan2d_routes

__all__ = ["SS2D", "SCAN_MODES", "ROUTES_2D", "ss2d_reference"]

SCAN_MODES = ("cross1d", "2d")
K_ROUTES = 4
# 2DVMamba's routes in the order of the released parameter groups k = 0..3: (origin, order).
ROUTES_2D = (("tl", "hv"), ("tl", "vh"), ("br", "hv"), ("br", "vh"))


def _dt_bias_init(d_inner: int, dt_min: float, dt_max: float, floor: float, device=None) -> Tensor:
    """Mamba's dt bias: inverse softplus of dt drawn log-uniformly in [dt_min, dt_max]."""
    dt = torch.exp(torch.rand(d_inner, device=device) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))


class SS2D(nn.Module):
    """VMamba v2's SS2D mixer ("v05_noz"), channel-first, with the 1D cross-scan or 2DVMamba's 2D scans.

    Args:
        d_model: channels C of the input and output.
        d_state: N, the state size per channel (1 in VMamba v2).
        ssm_ratio: d_inner = int(ssm_ratio * C).
        dt_rank: R; "auto" = ceil(C / 16).
        d_conv: depthwise conv kernel (3); conv_bias: its bias (False in VMamba v2).
        bias: bias of in_proj and out_proj (False in VMamba v2).
        dt_min, dt_max, dt_init_floor, dt_scale: Mamba's dt initialisation.
        scan: "cross1d" (VMamba) or "2d" (2DVMamba).
        backend: passed to :func:`ssm2d_nn.ops.scan2d` ("auto", "kernel" or "reference").
        dropout: dropout after out_proj.
        device, dtype: where and in which dtype the parameters are created (PyTorch's factory
            arguments; "meta" builds the module without memory).

    Parameters (K = 4 routes, released names): in_proj.weight (d_inner, C, 1, 1), conv2d.weight
    (d_inner, 1, d_conv, d_conv), x_proj_weight (K, R + 2N, d_inner), dt_projs_weight (K, d_inner, R),
    dt_projs_bias (K, d_inner), A_logs (K * d_inner, N), Ds (K * d_inner), out_norm.{weight,bias}
    (d_inner,), out_proj.weight (C, d_inner, 1, 1).

    Shapes: (B, C, H, W) -> (B, C, H, W), any H, W >= 1. Extra memory of the scan part in the
    forward: the route inputs (cross1d: one stacked copy of x and of its transpose, 2 * d_inner*H*W
    per image; 2d: none), the K deltas (K * d_inner*H*W) and the K outputs.
    """

    def __init__(self, d_model: int, d_state: int = 1, ssm_ratio: float = 1.0, dt_rank="auto", d_conv: int = 3,
                 conv_bias: bool = False, bias: bool = False, dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, dt_scale: float = 1.0, scan: str = "cross1d", backend: str = "auto",
                 dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if scan not in SCAN_MODES:
            raise ValueError(f"SS2D: scan must be one of {SCAN_MODES}, got {scan!r}")
        if d_model < 1 or d_state < 1:
            raise ValueError(f"SS2D: d_model and d_state must be >= 1, got {d_model}, {d_state}")
        self.d_model = int(d_model)
        self.d_state = int(d_state)
        self.d_inner = int(ssm_ratio * d_model)
        if self.d_inner < 1:
            raise ValueError(f"SS2D: ssm_ratio * d_model must be >= 1, got {ssm_ratio} * {d_model}")
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.scan = scan
        self.backend = backend
        self._dt_init = (dt_min, dt_max, dt_init_floor, dt_scale)
        d, n, r, k = self.d_inner, self.d_state, self.dt_rank, K_ROUTES

        # 1x1 projections as GEMMs (Conv1x1: nn.Conv2d's parameters, a matrix product in forward).
        self.in_proj = Conv1x1(d_model, d, bias=bias, **dd)
        self.conv2d = nn.Conv2d(d, d, d_conv, padding=(d_conv - 1) // 2, groups=d, bias=conv_bias, **dd)
        self.act = nn.SiLU()
        self.x_proj_weight = nn.Parameter(torch.empty(k, r + 2 * n, d, **dd))
        self.dt_projs_weight = nn.Parameter(torch.empty(k, d, r, **dd))
        self.dt_projs_bias = nn.Parameter(torch.empty(k, d, **dd))
        self.A_logs = nn.Parameter(torch.empty(k * d, n, **dd))
        self.Ds = nn.Parameter(torch.empty(k * d, **dd))
        self.out_norm = LayerNorm2d(d, **dd)
        self.out_proj = Conv1x1(d, d_model, bias=bias, **dd)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialisation of the released model (Mamba's dt/A/D init, trunc-normal projections)."""
        dt_min, dt_max, floor, dt_scale = self._dt_init
        d, r = self.d_inner, self.dt_rank
        dev = self.Ds.device
        for proj in (self.in_proj, self.out_proj):
            nn.init.trunc_normal_(proj.weight, std=0.02)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        self.conv2d.reset_parameters()
        bound = d ** -0.5  # nn.Linear(d_inner, R + 2N)'s default init, as the released x_proj
        self.x_proj_weight.uniform_(-bound, bound)
        std = r ** -0.5 * dt_scale
        self.dt_projs_weight.uniform_(-std, std)
        for k in range(K_ROUTES):
            self.dt_projs_bias[k].copy_(_dt_bias_init(d, dt_min, dt_max, floor, device=dev))
        a_log = torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32, device=dev))
        self.A_logs.copy_(a_log.expand_as(self.A_logs))
        self.Ds.fill_(1.0)
        self.out_norm.reset_parameters()
        self.A_logs._no_weight_decay = True
        self.Ds._no_weight_decay = True

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, dt_rank={self.dt_rank}, "
                f"scan={self.scan!r}, backend={self.backend!r}")

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.d_model:
            raise ValueError(f"SS2D: x must have shape (B, {self.d_model}, H, W), got {tuple(x.shape)}")
        c = self.conv2d(self.in_proj(x))
        # The scans' output comes in the model's layout: channels-last for a channels-last model, so
        # that out_norm (a LayerNorm over the channels) reads it without a copy, forward and backward.
        fmt = _memory_format(c)
        # The one-pass layout functions below are once differentiable, like the kernels; with the
        # reference backend (the way to higher-order gradients), and for torch.compile to trace, the
        # plain ops run instead.
        plain = self.backend == "reference" or torch.compiler.is_compiling()
        if self.scan == "cross1d":
            y = self._scan_cross1d(self.act(c), fmt, plain)
        else:
            # The scan kernel walks each (batch, channel) plane: unit-stride rows keep its loads
            # coalesced, so SiLU writes u contiguous (NCHW) whatever the model's layout, and its
            # gradient comes back in the convolution's layout.
            y = self._scan_2d(_silu_contiguous(c, plain), fmt)
        return self.dropout(self.out_proj(self.out_norm(y)))

    def _ssm_params(self, like: Tensor, routes: int):
        """A = -exp(A_logs) as (routes, channels, N), D and the dt bias as (routes, channels), in
        float32 (float64 for float64 inputs) as the scans use them; a route's channels are one
        contiguous block of the released (K * d_inner) layouts."""
        pdt = torch.float64 if like.dtype == torch.float64 else torch.float32
        A = -torch.exp(_as_dtype(self.A_logs, pdt))
        return (A.view(routes, -1, self.d_state), _as_dtype(self.Ds, pdt).view(routes, -1),
                _as_dtype(self.dt_projs_bias, pdt).view(routes, -1))

    def _scan_cross1d(self, u: Tensor, memory_format=torch.contiguous_format, plain: bool = False) -> Tensor:
        """The four 1D routes as two scan directions on a 1 x (H*W) grid, in one scan2d_routes call.

        A route has one scan direction for all its channels, so the four routes cannot be one
        route without flipped copies of the input. Instead the two layouts (row-major x and its
        transpose, column-major) are stacked once as G = 2 channel groups, and the same buffer is
        scanned forwards (origin "tl") and backwards (origin "tr", a negative stride, no copy).
        Route k = 2*s + j of the released parameters is direction s, layout j.
        """
        b, d, h, w = u.shape
        n, r, L = self.d_state, self.dt_rank, h * w
        c = r + 2 * n
        xs = _cross_layouts(u, plain)  # (b, 2, d, L): row-major x and its transpose, one copy each
        # x_proj of route (s, j) reads layout j: one GEMM with the (s, j, c) x (j', d) weight that is
        # zero where j != j', so its output rows come out in route order k = 2*s + j: (b, k, c, L).
        w_x = block_diagonal(self.x_proj_weight.to(u.dtype).view(2, 2, c, d))  # (s, (j, c), (j', d))
        x_dbl = batched_gemm(w_x.view(4 * c, 2 * d), xs.view(b, 2 * d, L)).view(b, 4, c, L)
        # Pieces by split rather than indexing: its backward is one cat of the pieces' gradients,
        # where each indexed view's backward fills a zeroed copy of the whole.
        dt_in, B_all, C_all = x_dbl.split([r, n, n], dim=2)
        # dt_proj grouped by route k, so delta comes out as (b, s, j, d, L): each direction's (j, d)
        # channels are one contiguous block of its route.
        delta = grouped_1x1(dt_in, self.dt_projs_weight.to(u.dtype)).view(b, 2, 2 * d, 1, L)
        A, D, bias = self._ssm_params(u, 2)
        # B_all, C_all: (b, (s, j), N, L) strided views of x_dbl -> (b, s, G = j, N, 1, L)
        y = scan2d_routes(xs.view(b, 2 * d, 1, L), delta, A, B_all.view(b, 2, 2, n, 1, L),
                          C_all.view(b, 2, 2, n, 1, L), D, bias, True, routes=(("tl", "hv"), ("tr", "hv")),
                          backend=self.backend)
        return _row_column_sum(y, h, w, memory_format, plain)

    def _scan_2d(self, u: Tensor, memory_format=torch.contiguous_format) -> Tensor:
        """The four 2D routes in one scan2d_routes call, all reading u (contiguous) in place.

        The routes differ in origin and order, which the kernels take per route; stacking them as
        channels of one scan would need a transposed (and for H != W differently shaped) copy of u.
        The projections of all four are computed at once in u's own layout.
        """
        b, d, h, w = u.shape
        n, r = self.d_state, self.dt_rank
        c = r + 2 * n
        x_dbl = conv1x1(u, self.x_proj_weight.to(u.dtype).view(4 * c, d)).view(b, 4, c, h * w)
        # Pieces by split rather than indexing (its backward is one cat, where an indexed view's
        # backward fills a zeroed copy of the whole tensor per piece).
        dt_part, B_all, C_all = x_dbl.split([r, n, n], dim=2)
        delta = grouped_1x1(dt_part, self.dt_projs_weight.to(u.dtype)).view(b, 4, d, h, w)
        A, D, bias = self._ssm_params(u, 4)
        return scan2d_routes(u, delta, A, B_all.view(b, 4, 1, n, h, w), C_all.view(b, 4, 1, n, h, w), D, bias,
                             True, routes=ROUTES_2D, backend=self.backend, memory_format=memory_format)


def _is_channels_last(t: Tensor) -> bool:
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


# cross1d's two layouts of the grid and back. _CrossLayouts (u -> the row-major and column-major
# copies, stacked) and _RowColumnSum (the two layouts summed back onto the grid) are each other's
# adjoint, so each backward is the other's forward: one pass each way, written in the layout its
# consumer wants, instead of autograd's clones of the whole stacked gradient per copied slice
# (in-place copies into a buffer), reshapes of transposed gradients and a stack. Traced by
# torch.compile (which refuses a strided ``out=``) they are plain ops.

def _split_layouts(t: Tensor) -> Tensor:
    """(b, d, H, W) in any layout -> (b, 2, d, H*W) contiguous: t row-major, then t transposed."""
    b, d, h, w = t.shape
    xs = t.new_empty((b, 2, d, h * w))
    xs[:, 0].view(b, d, h, w).copy_(t)
    xs[:, 1].view(b, d, w, h).copy_(t.transpose(2, 3))
    return xs


def _merge_layouts(y: Tensor, h: int, w: int, memory_format) -> Tensor:
    """(b, 2, d, H*W) -> (b, d, H, W) = row part + column part transposed, in ``memory_format``."""
    b, _, d, _ = y.shape
    out = torch.empty((b, d, h, w), dtype=y.dtype, device=y.device, memory_format=memory_format)
    torch.add(y[:, 0].view(b, d, h, w), y[:, 1].view(b, d, w, h).transpose(2, 3), out=out)
    return out


def _memory_format(t: Tensor):
    return torch.channels_last if _is_channels_last(t) else torch.contiguous_format


class _CrossLayouts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: Tensor) -> Tensor:
        ctx.hw, ctx.fmt = tuple(u.shape[2:]), _memory_format(u)
        return _split_layouts(u)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):
        return _merge_layouts(g.contiguous(), *ctx.hw, ctx.fmt)


class _RowColumnSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: Tensor, h: int, w: int, memory_format) -> Tensor:
        ctx.shape = y.shape
        b, d2 = y.shape[0], y.shape[1]
        return _merge_layouts(y.view(b, 2, d2 // 2, h * w), h, w, memory_format)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):
        return _split_layouts(g).view(ctx.shape), None, None, None


class _SiluContiguous(torch.autograd.Function):
    """silu(x) written contiguous (NCHW) in its one pass; the gradient in x's layout."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        return torch.ops.aten.silu.out(x, out=out)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):
        (x,) = ctx.saved_tensors
        grad = torch.empty_like(x)  # x's memory format
        return torch.ops.aten.silu_backward.grad_input(g, x, grad_input=grad)


def _silu_contiguous(x: Tensor, plain: bool = False) -> Tensor:
    """SiLU(x) as a contiguous tensor: for a channels-last x, the copy to NCHW made in the same pass
    (``plain``: two ops, differentiable any number of times and traceable)."""
    if plain or x.is_contiguous():
        return F.silu(x).contiguous()
    return _SiluContiguous.apply(x)


def _cross_layouts(u: Tensor, plain: bool = False) -> Tensor:
    """u (b, d, H, W) -> (b, 2, d, H*W): u in row-major order, then in column-major order
    (``plain``: the stacked copies as plain ops)."""
    if plain:
        b, d, h, w = u.shape
        return torch.stack([u.reshape(b, d, h * w), u.transpose(2, 3).reshape(b, d, h * w)], dim=1)
    return _CrossLayouts.apply(u)


def _row_column_sum(y: Tensor, h: int, w: int, memory_format, plain: bool = False) -> Tensor:
    """y (b, 2*d, 1, H*W) with the row-major routes' sum in channels [0, d) and the column-major
    one in [d, 2d) -> (b, d, H, W) = row part + column part transposed, in ``memory_format``
    (``plain``: as plain ops)."""
    if plain:
        b, d = y.shape[0], y.shape[1] // 2
        y_row, y_col = y.view(b, 2, d, h * w).unbind(1)
        return (y_row.view(b, d, h, w) + y_col.view(b, d, w, h).transpose(2, 3)).contiguous(memory_format=memory_format)
    return _RowColumnSum.apply(y, h, w, memory_format)


def ss2d_reference(module: SS2D, x: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """Slow reference of ``SS2D.forward`` in ``dtype`` (float64 by default), written like the released
    code: the routes are built with explicit flips and transposes (a (B, 4, d, L) cross-scan for
    "cross1d", re-laid copies for "2d"), projected with einsum, scanned one by one with
    :func:`scan2d_reference` from the top-left rows first, and mapped back before the sum.
    Dropout is not applied. Returns (B, C, H, W) in ``dtype``.
    """
    p = {name: t.detach().to(dtype) for name, t in module.named_parameters()}
    x = x.detach().to(dtype)
    d, n, r = module.d_inner, module.d_state, module.dt_rank
    u = F.conv2d(x, p["in_proj.weight"], p.get("in_proj.bias"))
    u = F.conv2d(u, p["conv2d.weight"], p.get("conv2d.bias"), padding=module.conv2d.padding, groups=d)
    u = F.silu(u)
    b, _, h, w = u.shape
    A = -torch.exp(p["A_logs"]).view(K_ROUTES, d, n)
    Ds = p["Ds"].view(K_ROUTES, d)
    bias = p["dt_projs_bias"]

    def route(k: int, xk: Tensor) -> Tensor:
        """Scans xk (b, d, hh, ww) with route k's parameters, top-left, rows first."""
        x_dbl = torch.einsum("bdhw,cd->bchw", xk, p["x_proj_weight"][k])
        dts, Bk, Ck = torch.split(x_dbl, [r, n, n], dim=1)
        delta = torch.einsum("brhw,dr->bdhw", dts, p["dt_projs_weight"][k])
        return scan2d_reference(xk, delta, A[k], Bk.unsqueeze(1), Ck.unsqueeze(1), Ds[k], None, bias[k], True)

    if module.scan == "cross1d":
        L = h * w
        xs = torch.stack([u.reshape(b, d, L), u.transpose(2, 3).reshape(b, d, L)], dim=1)
        xs = torch.cat([xs, xs.flip(-1)], dim=1)                        # (b, 4, d, L)
        ys = [route(k, xs[:, k].reshape(b, d, 1, L)).reshape(b, d, L) for k in range(K_ROUTES)]
        y_row = ys[0] + ys[2].flip(-1)
        y_col = ys[1] + ys[3].flip(-1)
        y = y_row.reshape(b, d, h, w) + y_col.reshape(b, d, w, h).transpose(2, 3)
    else:
        y = torch.zeros_like(u)
        for k, (origin, order) in enumerate(ROUTES_2D):
            xk = u.flip(2, 3) if origin == "br" else u
            xk = xk.transpose(2, 3) if order == "vh" else xk
            yk = route(k, xk.contiguous())
            yk = yk.transpose(2, 3) if order == "vh" else yk
            y = y + (yk.flip(2, 3) if origin == "br" else yk)
    y = F.layer_norm(y.permute(0, 2, 3, 1), (d,), p["out_norm.weight"], p["out_norm.bias"], module.out_norm.eps)
    y = y.permute(0, 3, 1, 2)
    return F.conv2d(y, p["out_proj.weight"], p.get("out_proj.bias"))
