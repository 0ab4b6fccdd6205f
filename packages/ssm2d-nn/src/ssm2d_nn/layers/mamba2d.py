"""The 2DMamba SSM layer on a dense 2D grid with a cell mask (the mixer of 2DMambaMIL).

Mamba's selective-SSM block with its 1D scan replaced by a 2D one::

    x, z  = in_proj(input)                      # (B, E, H, W) each, E = d_inner; no bias
    x     = x * mask                            # empty cells hold 0 before the conv
    u     = silu(dwconv3x3(x))                  # depthwise, with bias, zero "same" padding
    r,B,C = x_proj(u)                           # (R, N, N) per cell; no bias
    dt    = softplus(dt_proj(r)) * mask         # (B, E, H, W); Mamba's dt init
    y     = scan2d(u, dt, -exp(A_log), B, C, D, z=z)    # = SSM(u) * silu(z)
    out   = out_proj(y)                         # (B, C, H, W); no bias

``scan="wavefront2d"`` swaps the scan for Mamba2D's (two step sizes dT, dL and input matrices
BT, BL, from one x_proj producing [rT, rL, BT, BL, C]); everything else is the same.

Empty cells (mask False) are transparent to ``scan2d``: dt = 0 there makes the decay exp(0) = 1 and
the input dt*B*u = 0, so a state passes through an empty cell unchanged. Outputs at tissue cells are
therefore identical whether the grid is cropped to the tissue or embedded, with empty cells on any
side, in a larger canvas; and nothing written into empty cells reaches a tissue cell (the input is
zeroed before the conv, whose zero padding then matches an empty border). Outputs AT empty cells
are meaningless and must be ignored by the caller. For ``wavefront2d`` the state still passes
through empty cells with decay 1 and no input, but that scan halves the sum of two neighbours in
the interior and not on the first row/column: empty cells after the tissue (below/right for
origin "tl") change nothing, empty rows/columns before it do (a first-row tissue cell becomes an
interior cell), so feed it the tissue-cropped grid.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from ..backends import resolve_backend
from ..ops import scan2d, wavefront2d

__all__ = ["TwoDMambaLayer", "masked_softplus"]

SCANS = ("scan2d", "wavefront2d")
# Above this many cells (batch * H * W) checkpoint="auto" recomputes the layer in the backward.
CHECKPOINT_CELLS = 65536


class _MaskedSoftplus(torch.autograd.Function):
    """softplus(v + bias) * mask that saves only its output for the backward.

    d softplus(s)/ds = sigmoid(s) = 1 - exp(-softplus(s)), so the output alone gives the gradient,
    and at empty cells (output 0) the gradient is 0 as the mask demands. The output is the step
    size the scan saves anyway, so no extra (cells x d_inner) tensor is kept.
    """

    @staticmethod
    def forward(ctx, v: Tensor, bias: Tensor, mask: Optional[Tensor]) -> Tensor:
        acc = torch.float64 if v.dtype == torch.float64 else torch.float32
        out = F.softplus(v.to(acc) + bias.to(acc))
        if mask is not None:
            out = out * mask.to(acc)
        out = out.to(v.dtype)
        ctx.save_for_backward(out)
        ctx.bias_shape = bias.shape
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        (out,) = ctx.saved_tensors
        acc = torch.float64 if out.dtype == torch.float64 else torch.float32
        g = grad.to(acc) * -torch.expm1(-out.to(acc))
        return g.to(grad.dtype), g.sum_to_size(ctx.bias_shape), None


def masked_softplus(v: Tensor, bias: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """``softplus(v + bias) * mask`` (bias and mask broadcast against v), computed in float32
    (float64 for float64 v), returned in v's dtype; the backward keeps only the output."""
    return _MaskedSoftplus.apply(v, bias, mask)


def _dt_init_(proj: nn.Linear, dt_min: float, dt_max: float, floor: float, scale: float = 1.0) -> None:
    """Mamba's step-size init: weight U(+-rank^-0.5), bias = softplus^-1(dt), dt log-uniform in
    [dt_min, dt_max] (floored), so the initial steps span the time scales the scan can represent."""
    std = proj.in_features ** -0.5 * scale
    nn.init.uniform_(proj.weight, -std, std)
    dt = torch.exp(torch.rand(proj.out_features) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=floor)
    with torch.no_grad():
        proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
    proj.bias._no_reinit = True


def _a_log(d_inner: int, d_state: int) -> nn.Parameter:
    p = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
    p._no_weight_decay = True
    return p


def _acc(p: Tensor) -> Tensor:
    """A, D in float32 whatever the module dtype (float64 kept for float64 checks)."""
    return p if p.dtype == torch.float64 else p.float()


def _cf_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """A linear map over the channels of a channels-first (B, C, L) tensor: (B, out, L), one GEMM,
    output contiguous (no layout transposes)."""
    y = torch.matmul(weight.to(x.dtype) if not torch.is_autocast_enabled(x.device.type) else weight, x)
    return y if bias is None else y + bias[:, None]


class TwoDMambaLayer(nn.Module):
    """The 2DMamba selective-SSM layer on a dense grid (see the module docstring for the math).

    Args:
        dim: channels C of input and output.
        d_inner: inner width E (default 2 * dim).
        d_state: N, states per channel (16).
        dt_rank: R, rank of the step-size projection (default ceil(dim / 16), as Mamba).
        d_conv: depthwise conv kernel, an odd int or an (odd, odd) pair (3 = 3x3; (1, 3) for a 1 x L
            sequence grid), "same" zero padding, with bias.
        scan: "scan2d" (2DMamba, rows then columns) or "wavefront2d" (Mamba2D).
        origin, order: the scan's start corner and, for scan2d, "hv" rows first or "vh".
        backend: "auto", "kernel" or "reference", passed to the op; ``last_backend`` records which
            one the last forward ran ("kernel" or "reference").
        checkpoint: True, False or "auto" (on when gradients are needed and batch*H*W >= 65536 cells):
            recompute the layer in the backward so that between forward and backward it keeps only
            its input (B, C, H, W) instead of ~8 (B, E, H, W) activations (memory note below).
        dt_min, dt_max, dt_init_floor: Mamba's dt init range.

    Parameters (scan2d): in_proj (2E, C), conv (E, 1, k, k) + (E,), x_proj (R + 2N, E),
    dt_proj (E, R) + (E,), A_log (E, N) = log(1..N), D (E,) = 1, out_proj (C, E).
    wavefront2d: x_proj (2R + 3N, E), dt_proj_t/dt_proj_l (E, R) + (E,), AT_log/AL_log (E, N), D.

    Shapes: forward(x (B, C, H, W), mask (B, H, W) bool or None = all cells valid) -> (B, C, H, W),
    in x's dtype (or autocast's). Any memory layout of x is accepted.

    Memory (scan2d, M = B*H*W cells, E = d_inner, s = bytes per element: 2 under bf16 autocast,
    4 in fp32). Without checkpointing the autograd graph keeps, per layer: the input (C*M*s), the
    masked x (conv input), conv output, u, z, dt, the op's pre-gate output y, and the gated output
    (out_proj input): 7 tensors of E*M*s, plus x_proj's (R+2N)*M*s. dt's softplus keeps only its
    output, which the scan saves anyway. E = 256, M = 250k cells, bf16: 7 * 128 MB ~ 0.9 GB;
    the CUDA scan kernel adds N/16 * E*M float32 carries (256 MB). With checkpointing only the
    input (C*M*s, 64 MB) stays until the backward, which recomputes the rest; the backward's peak is
    then the recomputed activations plus the op's gradients du, ddt, dz and the output gradient
    (~10 E*M*s, ~1.3 GB at that size in bf16), but it is reached inside one layer at a time.
    """

    def __init__(self, dim: int, d_inner: Optional[int] = None, d_state: int = 16, dt_rank: Optional[int] = None,
                 d_conv: Union[int, tuple[int, int]] = 3, *, scan: str = "scan2d", origin: str = "tl",
                 order: str = "hv", backend: str = "auto", checkpoint: Union[bool, str] = "auto",
                 dt_min: float = 1e-3, dt_max: float = 1e-1, dt_init_floor: float = 1e-4):
        super().__init__()
        if scan not in SCANS:
            raise ValueError(f"TwoDMambaLayer: scan must be one of {SCANS}, got {scan!r}")
        if checkpoint not in (True, False, "auto"):
            raise ValueError(f"TwoDMambaLayer: checkpoint must be True, False or 'auto', got {checkpoint!r}")
        kernel = (d_conv, d_conv) if isinstance(d_conv, int) else tuple(d_conv)
        if len(kernel) != 2 or any(k < 1 or k % 2 == 0 for k in kernel):
            raise ValueError(f"TwoDMambaLayer: d_conv must be an odd int or a pair of odd ints, got {d_conv!r}")
        self.dim, self.d_inner = dim, d_inner or 2 * dim
        self.d_state, self.dt_rank = d_state, dt_rank or math.ceil(dim / 16)
        self.scan, self.origin, self.order, self.backend, self.checkpoint = scan, origin, order, backend, checkpoint
        self.last_backend: Optional[str] = None
        e, n, r = self.d_inner, d_state, self.dt_rank
        self.in_proj = nn.Linear(dim, 2 * e, bias=False)
        self.conv = nn.Conv2d(e, e, kernel, padding=(kernel[0] // 2, kernel[1] // 2), groups=e, bias=True)
        if scan == "scan2d":
            self.x_proj = nn.Linear(e, r + 2 * n, bias=False)
            self.dt_proj = nn.Linear(r, e, bias=True)
            _dt_init_(self.dt_proj, dt_min, dt_max, dt_init_floor)
            self.A_log = _a_log(e, n)
        else:
            self.x_proj = nn.Linear(e, 2 * r + 3 * n, bias=False)
            self.dt_proj_t = nn.Linear(r, e, bias=True)
            self.dt_proj_l = nn.Linear(r, e, bias=True)
            _dt_init_(self.dt_proj_t, dt_min, dt_max, dt_init_floor)
            _dt_init_(self.dt_proj_l, dt_min, dt_max, dt_init_floor)
            self.AT_log = _a_log(e, n)
            self.AL_log = _a_log(e, n)
        self.D = nn.Parameter(torch.ones(e))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(e, dim, bias=False)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, d_inner={self.d_inner}, d_state={self.d_state}, dt_rank={self.dt_rank}, "
                f"scan={self.scan!r}, origin={self.origin!r}, backend={self.backend!r}, checkpoint={self.checkpoint!r}")

    # -- public ------------------------------------------------------------------------------------

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """x (B, C, H, W), mask (B, H, W) bool or None -> (B, C, H, W); see the class docstring."""
        if x.dim() != 4 or x.shape[1] != self.dim:
            raise ValueError(f"TwoDMambaLayer: x must have shape (B, C={self.dim}, H, W), got {tuple(x.shape)}")
        b, _, h, w = x.shape
        if mask is not None:
            if tuple(mask.shape) != (b, h, w):
                raise ValueError(f"TwoDMambaLayer: mask must have shape (B, H, W) = {(b, h, w)}, got {tuple(mask.shape)}")
            if mask.device != x.device:
                raise ValueError(f"TwoDMambaLayer: mask is on {mask.device} but x is on {x.device}")
        self.last_backend = self._resolve(x)
        if self._use_checkpoint(x):
            return _checkpoint(self._forward, x, mask, use_reentrant=False)
        return self._forward(x, mask)

    # -- internals ---------------------------------------------------------------------------------

    def _use_checkpoint(self, x: Tensor) -> bool:
        if not torch.is_grad_enabled() or not (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return False
        if self.checkpoint == "auto":
            return x.shape[0] * x.shape[2] * x.shape[3] >= CHECKPOINT_CELLS
        return bool(self.checkpoint)

    def _resolve(self, x: Tensor) -> str:
        """The backend the op will run, with the same per-call exclusions the ops apply."""
        unsupported = None
        if x.is_cuda and x.dtype == torch.float64:
            unsupported = "the CUDA kernel takes float32, float16 or bfloat16, not float64"
        elif self.scan == "wavefront2d" and x.is_cuda and min(x.shape[2], x.shape[3]) > 2048:
            unsupported = "the CUDA kernel scans grids with H or W <= 2048"
        return resolve_backend(self.scan, self.backend, x.device, unsupported=unsupported)

    def _forward(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        return self._forward_scan2d(x, mask) if self.scan == "scan2d" else self._forward_wavefront(x, mask)

    def _forward_scan2d(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        # Channels first throughout: scan2d wants (B, E, H, W), and every projection is one GEMM
        # weight @ (B, C, L) on the flattened grid, so no layout transposes are needed.
        b, c, h, w = x.shape
        e, n, r = self.d_inner, self.d_state, self.dt_rank
        flat = x.reshape(b, c, h * w)
        m = None if mask is None else mask.reshape(b, 1, h * w)
        w_x, w_z = self.in_proj.weight[:e], self.in_proj.weight[e:]
        xi = _cf_linear(flat, w_x)
        if m is not None:
            xi = xi * m.to(xi.dtype)
        z = _cf_linear(flat, w_z)
        u = F.silu(self.conv(xi.view(b, e, h, w)))
        del xi
        proj = _cf_linear(u.view(b, e, h * w), self.x_proj.weight)
        dt = masked_softplus(_cf_linear(proj[:, :r], self.dt_proj.weight), self.dt_proj.bias[:, None], m)
        B = proj[:, r:r + n].reshape(b, 1, n, h, w).contiguous()
        C = proj[:, r + n:].reshape(b, 1, n, h, w).contiguous()
        A = -torch.exp(_acc(self.A_log))
        y = scan2d(u, dt.view(b, e, h, w), A, B.to(u.dtype), C.to(u.dtype), _acc(self.D),
                   z=z.view(b, e, h, w).to(u.dtype), delta_softplus=False, origin=self.origin, order=self.order,
                   backend=self.last_backend)
        return _cf_linear(y.view(b, e, h * w), self.out_proj.weight).view(b, c, h, w)

    def _forward_wavefront(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        # wavefront2d is channels last. One permute of the (narrow, C-channel) input; the conv runs
        # on a channels-last-strided NCHW view (conv2d keeps that layout), so u comes back as a free
        # view, and the output goes back to NCHW as a view of the (B, H, W, C) result.
        b, c, h, w = x.shape
        e, n, r = self.d_inner, self.d_state, self.dt_rank
        xl = x.permute(0, 2, 3, 1)
        m = None if mask is None else mask[..., None]
        xi = F.linear(xl, self.in_proj.weight[:e])
        if m is not None:
            xi = xi * m.to(xi.dtype)
        z = F.linear(xl, self.in_proj.weight[e:])
        u = F.silu(self.conv(xi.permute(0, 3, 1, 2))).permute(0, 2, 3, 1).contiguous()
        del xi
        proj = F.linear(u, self.x_proj.weight)
        r_t, r_l, bt, bl, cc = proj.split([r, r, n, n, n], dim=-1)
        dT = masked_softplus(F.linear(r_t, self.dt_proj_t.weight), self.dt_proj_t.bias, m)
        dL = masked_softplus(F.linear(r_l, self.dt_proj_l.weight), self.dt_proj_l.bias, m)
        y = wavefront2d(u, dT, dL, -torch.exp(_acc(self.AT_log)), -torch.exp(_acc(self.AL_log)),
                        bt.contiguous().to(u.dtype), bl.contiguous().to(u.dtype), cc.contiguous().to(u.dtype),
                        _acc(self.D), origin=self.origin, backend=self.last_backend)
        y = y * F.silu(z.to(y.dtype))
        return F.linear(y, self.out_proj.weight).permute(0, 3, 1, 2)
