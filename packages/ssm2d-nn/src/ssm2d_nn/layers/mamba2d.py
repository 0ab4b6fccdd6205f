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
from ..ops import depthwise_conv2d, scan2d, wavefront2d
from ..ops._wavefront2d_kernel import cuda_refusal as wavefront2d_cuda_refusal

__all__ = ["TwoDMambaLayer", "masked_softplus"]

SCANS = ("scan2d", "wavefront2d")
# checkpoint="auto" keeps the plain layer (the fastest: nothing recomputed) while what it keeps for
# the backward, estimated by plain_layer_saved_bytes, stays at or under CHECKPOINT_BYTES; above it
# the memory-lean path runs. The 2DMambaMIL training step at 150k patches (bf16) took 39.3 ms with
# the lean path and 30.1 ms plain, 1.44 vs 2.07 GiB beyond its inputs, on an H100
# (benchmarks/results/2026-12-06-h100-mil-checkpoint-b0780e7; with this policy:
# 2026-12-06-h100-mil-step-models-9a1635d).
CHECKPOINT_BYTES = 4 << 30
# Activations the plain layer keeps per inner channel and cell (xi, conv output, u, z, dt and the
# scan's operands and output, their casts), in the activations' dtype; the scan's float32 carries
# come on top. Measured: 2.07 GiB beyond the inputs for 256 x 236,684 channel-cells at bf16 (the
# estimate below gives 2.25 GiB).
SAVED_ACTIVATIONS_PER_CHANNEL_CELL = 16


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


def _masked_steps(v: Tensor, mask: Optional[Tensor]) -> Tensor:
    """The step sizes before scan2d's own ``delta_bias`` and softplus, -inf at empty cells: there
    softplus(-inf + bias) = 0 exactly (decay 1, no input: transparent, as masked_softplus makes them)
    and its gradient is 0. One pass in v's dtype instead of masked_softplus's float32 passes (the
    scan kernels apply the bias and the softplus in registers)."""
    return v if mask is None else torch.where(mask, v, float("-inf"))


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
    """A linear map over the channels of a channels-first (B, C, L) tensor: (B, out, L), output
    contiguous, no layout copies. With B == 1 (a MIL slide) one ``mm`` on x[0] (C, L), whose rows may
    be strided (a channel slice); ``matmul(weight, x)`` would fold (B, C, L) into (B*L, C) instead, a
    transposed copy of x per call (on a 150k-patch slide 5 such copies, 2.3 ms of a 25 ms step)."""
    w = weight.to(x.dtype) if not torch.is_autocast_enabled(x.device.type) else weight
    y = torch.mm(w, x[0]).unsqueeze(0) if x.shape[0] == 1 else torch.matmul(w, x)
    return y if bias is None else y + bias[:, None]


# The chunked scan2d layer (checkpoint on) runs d_inner channels in chunks of about this many
# elements (chunk channels x batch*H*W cells), so that one chunk's scan workspace lives at a time,
# but never fewer than MIN_CHUNK_CHANNELS: the CUDA scan runs one block per (batch, channel), so a
# narrower chunk leaves most of the GPU idle. Measured on the H100 at 150k patches (237k cells,
# bf16, benchmarks/results/2026-11-22-h100-models-mil-56bbd6b/bench_mil_chunks.md): 32 channels
# 233 ms / 806 MiB peak, 64: 126 ms / 1016 MiB, 128: 79 ms / 1435 MiB, 256 (one chunk): 66 ms /
# 2159 MiB, inputs (586 MiB of features) included.
CHUNK_ELEMENTS = 1 << 23
MIN_CHUNK_CHANNELS = 128


def _chunk_channels(e: int, cells: int, chunk: Optional[int]) -> int:
    """Channels per chunk: the given count, or CHUNK_ELEMENTS // cells rounded down to a multiple of
    8 (GEMM-friendly), at least MIN_CHUNK_CHANNELS (or E), at most E."""
    if chunk is not None:
        return max(1, min(e, int(chunk)))
    k = CHUNK_ELEMENTS // max(cells, 1)
    return max(min(MIN_CHUNK_CHANNELS, e), min(e, k // 8 * 8 if k >= 8 else k))


def _autocast_state(device_type: str):
    """The ambient autocast (enabled, dtype) for ``device_type``, to re-enter it in a backward."""
    if torch.is_autocast_enabled(device_type):
        return True, torch.get_autocast_dtype(device_type)
    return False, None


class _ChunkedScan2dLayer(torch.autograd.Function):
    """The scan2d layer's math from its (B, C, L) input to its (B, C, L) output, run over the E inner
    channels in chunks, saving only the input and the (B, R + 2N, L) x_proj output for the backward.

    Every inner channel is independent given dt's low-rank input r and the shared B, C, except
    through x_proj (proj = W_xp @ u sums over all channels), so:

    forward:  pass 1 per chunk: u_c = silu(conv_c(mask * W_x[c] @ x)); proj += W_xp[:, c] @ u_c.
              pass 2 per chunk: z_c = W_z[c] @ x, dt_c = softplus(W_dt[c] @ r + b_c) (0 at empty cells),
              y_c = scan2d(u_c, dt_c, ..., z=z_c); out += W_out[:, c] @ y_c.
    backward: pass 1 per chunk: recompute u_c, z_c and the gated scan (a small graph: softplus,
              scan2d with its carries), feed it dy_c = W_out[:, c]^T @ dout: du_c (kept, E x L in
              u's dtype), dz_c (into dx at once), and the sums dr, dB, dC and parameter gradients.
              pass 2 per chunk: recompute xi_c -> u_c with a graph and back-propagate du_c plus
              x_proj's share (dproj through W_xp[:, c]) into dxi_c, then into dx.

    The sums over chunks that the plain layer does inside one GEMM (proj, out, dx) accumulate in
    float32 (float64 for float64) with the weights rounded to the autocast dtype first, as autocast's
    GEMM would: values and gradients are the plain layer's up to summation order. The per-chunk
    graphs use the plain layer's ops (scan2d with its softplus, depthwise conv, silu).

    Memory (L = B*H*W cells, k = channels per chunk): saved between forward and backward: x (C*L)
    and proj ((R+2N)*L) in the grid dtype. Backward peak: dout (C*L), du (E*L, u's dtype), dx
    (C*L float32), dproj ((R+2N)*L float32) and one chunk's tensors (~16 k*L elements: u, z, xi,
    conv output, dt and its float32 temporaries, y, the scan's k*N/16*L float32 carries, du, dz,
    ddt), instead of ~10 E*L activations plus E*N/16*L float32 carries all at once.
    """

    @staticmethod
    def forward(ctx, x, mask, w_in, conv_w, conv_b, w_xp, w_dt, b_dt, a_log, d_skip, w_out, cfg):
        ctx.cfg = cfg
        ctx.autocast = _autocast_state(x.device.type)
        e, slices = cfg["e"], cfg["slices"]
        with torch.no_grad():
            us = [_u_from_xi(cfg, _cf_linear(x, w_in[sl]), mask, conv_w, conv_b, sl) for sl in slices]
            proj = _sum_chunks(_cf_linear(u, w_xp[:, sl]) for u, sl in zip(us, slices))
            r_, bm, cm = _split_proj(cfg, proj)
            out = None
            for i, sl in enumerate(slices):
                u, us[i] = us[i], None  # each u dies after its chunk's scan
                z = _cf_linear(x, w_in[e + sl.start:e + sl.stop])
                y = _gated_scan(cfg, u, z, mask, r_, bm, cm, w_dt, b_dt, a_log, d_skip, sl)
                if len(slices) == 1:  # one chunk: the plain layer's GEMM, bit for bit
                    out = _cf_linear(y, w_out)
                    break
                if out is None:
                    out = torch.zeros(x.shape[0], w_out.shape[0], x.shape[2], dtype=_acc_dtype(y), device=x.device)
                _gemm_acc_(out, w_out[:, sl], y, ctx.autocast)
                del u, z, y
        ctx.save_for_backward(x, mask, w_in, conv_w, conv_b, w_xp, w_dt, b_dt, a_log, d_skip, w_out, proj)
        return out if len(slices) == 1 else out.to(_gemm_dtype(proj, ctx.autocast))

    @staticmethod
    def backward(ctx, dout):
        cfg = ctx.cfg
        e, slices = cfg["e"], cfg["slices"]
        x, mask, *params, proj = ctx.saved_tensors
        # Detached: the hand-written products below (dx, dW) run under enable_grad for the
        # per-chunk graphs and must not grow a graph of their own through the saved parameters.
        x, proj = x.detach(), proj.detach()
        params = [p.detach() for p in params]
        enabled, dtype = ctx.autocast
        w_in, conv_w, conv_b, w_xp, w_dt, b_dt, a_log, d_skip, w_out = params
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        d_in, d_conv_w, d_conv_b, d_xp, d_dt, d_bdt, d_alog, d_d, d_out = (
            torch.zeros(p.shape, dtype=acc, device=p.device) for p in params)
        leaves = [t.detach().requires_grad_() for t in (conv_w, conv_b, w_xp, w_dt, b_dt, a_log, d_skip)]
        conv_w_l, conv_b_l, w_xp_l, w_dt_l, b_dt_l, a_log_l, d_l = leaves
        dx = torch.zeros(x.shape, dtype=acc, device=x.device)
        r_, bm, cm = (t.detach().requires_grad_() for t in _split_proj(cfg, proj))
        dr, dbm, dcm = (torch.zeros(t.shape, dtype=acc, device=t.device) for t in (r_, bm, cm))
        xt = x.transpose(1, 2)
        du = None
        with torch.enable_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
            for sl in slices:  # pass 1: out_proj, gated scan, softplus, z
                zsl = slice(e + sl.start, e + sl.stop)
                with torch.no_grad():
                    u = _u_from_xi(cfg, _cf_linear(x, w_in[sl]), mask, conv_w, conv_b, sl)
                    z = _cf_linear(x, w_in[zsl])
                    dy = _cf_linear(dout, w_out[:, sl].t())
                u.requires_grad_()
                z.requires_grad_()
                y = _gated_scan(cfg, u, z, mask, r_, bm, cm, w_dt_l, b_dt_l, a_log_l, d_l, sl)
                d_out[:, sl] += torch.matmul(dout, y.detach().transpose(1, 2)).sum(0)
                g = torch.autograd.grad(y, [u, z, r_, bm, cm, w_dt_l, b_dt_l, a_log_l, d_l], dy.to(y.dtype),
                                        allow_unused=True)
                del y, dy
                if du is None:
                    du = torch.empty((x.shape[0], e, x.shape[2]), dtype=g[0].dtype, device=x.device)
                du[:, sl] = g[0]
                _gemm_acc_(dx, w_in[zsl].t(), g[1], ctx.autocast)
                d_in[zsl] += torch.matmul(g[1], xt).sum(0)
                _accumulate([dr, dbm, dcm, d_dt, d_bdt, d_alog, d_d], g[2:])
                del g, u, z
            dproj = _join_proj(cfg, dr, dbm, dcm)
            del dr, dbm, dcm
            for sl in slices:  # pass 2: x_proj, silu, conv, mask, x's projection
                with torch.no_grad():
                    xi = _cf_linear(x, w_in[sl])
                xi.requires_grad_()
                u = _u_from_xi(cfg, xi, mask, conv_w_l, conv_b_l, sl)
                pc = _cf_linear(u, w_xp_l[:, sl])
                g = torch.autograd.grad([u, pc], [xi, conv_w_l, conv_b_l, w_xp_l],
                                        [du[:, sl].to(u.dtype), dproj.to(pc.dtype)], allow_unused=True)
                del u, pc
                _gemm_acc_(dx, w_in[sl].t(), g[0], ctx.autocast)
                d_in[sl] += torch.matmul(g[0], xt).sum(0)
                _accumulate([d_conv_w, d_conv_b, d_xp], g[1:])
                del g, xi
        grads = [d_in, d_conv_w, d_conv_b, d_xp, d_dt, d_bdt, d_alog, d_d, d_out]
        out_grads = [gr.to(p.dtype) if ctx.needs_input_grad[i + 2] else None
                     for i, (gr, p) in enumerate(zip(grads, params))]
        return (dx.to(x.dtype) if ctx.needs_input_grad[0] else None, None, *out_grads, None)


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _gemm_dtype(t: Tensor, autocast) -> torch.dtype:
    """The dtype a GEMM on ``t`` runs in: autocast's when it is on, else t's."""
    enabled, dtype = autocast
    return dtype if enabled and t.dtype in (torch.float32, torch.float16, torch.bfloat16) else t.dtype


def _gemm_acc_(acc: Tensor, weight: Tensor, v: Tensor, autocast) -> None:
    """acc (B, M, L) += weight (M, K) @ v (B, K, L), in place in acc's dtype (no (B, M, L) temporary).
    Operands are rounded to the GEMM dtype first (as autocast's GEMM would), so the products are
    those of the plain layer and only the summation is in acc's precision."""
    dt = _gemm_dtype(v, autocast)
    w = weight.to(dt).to(acc.dtype)
    with torch.autocast(acc.device.type, enabled=False):  # the sum stays in acc's dtype
        acc.baddbmm_(w.expand(v.shape[0], -1, -1), v.to(dt).to(acc.dtype))


def _accumulate(accs, grads) -> None:
    for a, g in zip(accs, grads):
        if g is not None:
            a += g


def _sum_chunks(parts) -> Tensor:
    """Sum of per-chunk (B, M, L) partial products in float32 (float64 for float64), returned in
    the parts' dtype (what the single GEMM over all channels would return)."""
    total, dtype = None, None
    for p in parts:
        dtype = p.dtype
        p = p.to(_acc_dtype(p))
        total = p if total is None else total.add_(p)
    return total.to(dtype)


def _split_proj(cfg, proj: Tensor):
    """proj (B, R + 2N, L) -> r (B, R, L), B and C (B, 1, N, H, W) contiguous."""
    b, h, w, n, r = cfg["b"], cfg["h"], cfg["w"], cfg["n"], cfg["r"]
    return (proj[:, :r], proj[:, r:r + n].reshape(b, 1, n, h, w).contiguous(),
            proj[:, r + n:].reshape(b, 1, n, h, w).contiguous())


def _join_proj(cfg, dr: Tensor, db: Tensor, dc: Tensor) -> Tensor:
    b, n = cfg["b"], cfg["n"]
    return torch.cat([dr, db.reshape(b, n, -1), dc.reshape(b, n, -1)], dim=1)


def _u_from_xi(cfg, xi, mask, conv_w, conv_b, sl) -> Tensor:
    """u for channels ``sl`` from their in_proj rows xi (B, k, L): silu(depthwise conv(mask * xi))."""
    b, h, w = cfg["b"], cfg["h"], cfg["w"]
    if mask is not None:
        xi = xi * mask.to(xi.dtype)
    k = xi.shape[1]
    u = F.silu(depthwise_conv2d(xi.view(b, k, h, w), conv_w[sl], conv_b[sl], backend=_conv_backend(cfg["backend"])))
    return u.view(b, k, h * w)


def _conv_backend(scan_backend: str) -> str:
    """The depthwise convolution's backend for the layer's scan backend: PyTorch's for "reference"
    (float64 checks, higher-order gradients), else the kernel where it fits (it has no CPU kernel,
    so "kernel" for the scan does not make the convolution refuse the CPU)."""
    return "reference" if scan_backend == "reference" else "auto"


def _gated_scan(cfg, u, z, mask, r_, bm, cm, w_dt, b_dt, a_log, d_skip, sl) -> Tensor:
    """scan2d(u, dt, ...) * silu(z) for channels ``sl``, (B, k, L); dt = softplus(W_dt[sl] @ r + b) at
    tissue cells, 0 at empty ones (the scan applies the bias and the softplus)."""
    b, h, w = cfg["b"], cfg["h"], cfg["w"]
    k = u.shape[1]
    delta = _masked_steps(_cf_linear(r_, w_dt[sl]), mask)
    y = scan2d(u.view(b, k, h, w), delta.view(b, k, h, w), -torch.exp(_acc(a_log[sl])), bm.to(u.dtype),
               cm.to(u.dtype), _acc(d_skip[sl]), z=z.view(b, k, h, w).to(u.dtype), delta_bias=_acc(b_dt[sl]),
               delta_softplus=True, origin=cfg["origin"], order=cfg["order"], backend=cfg["backend"])
    return y.view(b, k, h * w)


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
        checkpoint: True, False or "auto" (on when gradients are needed and the plain layer would keep
            more than CHECKPOINT_BYTES = 4 GiB for the backward: ``plain_layer_saved_bytes``, about
            40 bytes per inner channel and cell under bf16 autocast, 72 in float32; 2DMambaMIL at
            150k patches (256 x 236,684 channel-cells) stays plain under bf16).
            On, scan2d runs the channel-chunked layer (_ChunkedScan2dLayer), wavefront2d recomputes
            the layer with torch.utils.checkpoint; either way only the input (and for scan2d the
            narrow x_proj output) is kept between forward and backward (memory note below).
        dt_min, dt_max, dt_init_floor: Mamba's dt init range.
        chunk_channels: inner channels per chunk of the chunked scan2d path; None (default) picks
            CHUNK_ELEMENTS (8M) // (batch*H*W), a multiple of 8, at least 128, at most E.

    Parameters (scan2d): in_proj (2E, C), conv (E, 1, k, k) + (E,), x_proj (R + 2N, E),
    dt_proj (E, R) + (E,), A_log (E, N) = log(1..N), D (E,) = 1, out_proj (C, E).
    wavefront2d: x_proj (2R + 3N, E), dt_proj_t/dt_proj_l (E, R) + (E,), AT_log/AL_log (E, N), D.

    Shapes: forward(x (B, C, H, W), mask (B, H, W) bool or None = all cells valid) -> (B, C, H, W),
    in x's dtype (or autocast's). Any memory layout of x is accepted.

    Memory (scan2d, M = B*H*W cells, E = d_inner, s = bytes per element: 2 under bf16 autocast,
    4 in fp32; E = 256, C = 128, N = 16, M = 237k cells (150k patches at 63% fill), bf16).
    Without checkpointing the autograd graph keeps, per layer: the input (C*M*s), the masked x
    (conv input), conv output, u, z, dt, the op's pre-gate output y and the gated output (out_proj
    input): 7 tensors of E*M*s (7 x 116 MiB), x_proj's (R+2N)*M*s, and on CUDA the scan's
    N/16 * E*M float32 tile carries (252 MiB): ~1.1 GiB kept, more in the backward.
    With checkpointing (scan2d: the chunked path) the layer keeps only its input C*M*s (58 MiB)
    and the x_proj output (R+2N)*M*s (18 MiB). Its backward holds the output gradient C*M*s
    (58 MiB), du E*M*s (116 MiB), dx C*M*4 (116 MiB), dproj (R+2N)*M*4 and one chunk of k
    channels at a time (k*M-element tensors: u, z, xi, conv output, dt with its float32
    temporaries, y, dy, du, dz, ddt, and the k*N/16*M float32 carries; k = 32 at this size,
    ~0.2 GiB): ~0.55 GiB at the peak, where torch.utils.checkpoint re-ran the whole layer at once
    (~1.4 GiB: every activation, the E*M carries, float32 softplus temporaries, then du, ddt, dz).
    ``benchmarks/mil_memory.py`` counts these bytes for a given grid.
    """

    def __init__(self, dim: int, d_inner: Optional[int] = None, d_state: int = 16, dt_rank: Optional[int] = None,
                 d_conv: Union[int, tuple[int, int]] = 3, *, scan: str = "scan2d", origin: str = "tl",
                 order: str = "hv", backend: str = "auto", checkpoint: Union[bool, str] = "auto",
                 dt_min: float = 1e-3, dt_max: float = 1e-1, dt_init_floor: float = 1e-4,
                 chunk_channels: Optional[int] = None):
        super().__init__()
        if chunk_channels is not None and (not isinstance(chunk_channels, int) or chunk_channels < 1):
            raise ValueError(f"TwoDMambaLayer: chunk_channels must be a positive int or None, got {chunk_channels!r}")
        self.chunk_channels = chunk_channels
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
            if self.scan == "scan2d":
                return self._forward_scan2d_chunked(x, mask)
            return _checkpoint(self._forward, x, mask, use_reentrant=False)
        return self._forward(x, mask)

    # -- internals ---------------------------------------------------------------------------------

    def _use_checkpoint(self, x: Tensor) -> bool:
        if not torch.is_grad_enabled() or not (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return False
        if self.checkpoint == "auto":
            return self.plain_layer_saved_bytes(x) > CHECKPOINT_BYTES
        return bool(self.checkpoint)

    def plain_layer_saved_bytes(self, x: Tensor) -> int:
        """Estimated bytes the plain layer (checkpoint off) keeps between forward and backward for an
        input shaped like x: SAVED_ACTIVATIONS_PER_CHANNEL_CELL activations per inner channel and
        cell in the activations' dtype (autocast's when it is on) plus the scan's float32 carries
        ((1 + ceil(N / 16)) values per channel and cell). checkpoint="auto" compares it with
        CHECKPOINT_BYTES."""
        cells = x.shape[0] * x.shape[2] * x.shape[3]
        kind = x.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
        carries = 4 * (1 + -(-self.d_state // 16))
        return cells * self.d_inner * (SAVED_ACTIVATIONS_PER_CHANNEL_CELL * dtype.itemsize + carries)

    def _resolve(self, x: Tensor) -> str:
        """The backend the op will run, with the same per-call exclusions the ops apply."""
        unsupported = None
        if x.is_cuda and x.dtype == torch.float64:
            unsupported = "the CUDA kernel takes float32, float16 or bfloat16, not float64"
        elif self.scan == "wavefront2d" and x.is_cuda:
            unsupported = wavefront2d_cuda_refusal(x.shape[2], x.shape[3], self.d_inner, self.d_state)
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
        u = F.silu(depthwise_conv2d(xi.view(b, e, h, w), self.conv.weight, self.conv.bias,
                                    backend=_conv_backend(self.backend)))
        del xi
        proj = _cf_linear(u.view(b, e, h * w), self.x_proj.weight)
        # dt = softplus(dt_proj(r) + bias) at tissue cells, 0 at empty ones: the scan applies the bias
        # and the softplus to the raw projection (-inf at empty cells).
        delta = _masked_steps(_cf_linear(proj[:, :r], self.dt_proj.weight), m)
        B = proj[:, r:r + n].reshape(b, 1, n, h, w).contiguous()
        C = proj[:, r + n:].reshape(b, 1, n, h, w).contiguous()
        A = -torch.exp(_acc(self.A_log))
        y = scan2d(u, delta.view(b, e, h, w), A, B.to(u.dtype), C.to(u.dtype), _acc(self.D),
                   z=z.view(b, e, h, w).to(u.dtype), delta_bias=_acc(self.dt_proj.bias), delta_softplus=True,
                   origin=self.origin, order=self.order, backend=self.last_backend)
        return _cf_linear(y.view(b, e, h * w), self.out_proj.weight).view(b, c, h, w)

    def _forward_scan2d_chunked(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        # Replaces torch.utils.checkpoint for scan2d: the checkpoint kept only the input too, but its
        # backward re-ran the whole layer at once (~8 E x cells activations, the E x cells float32
        # carries and the float32 softplus temporaries alive together, then du, ddt, dz); here one
        # chunk of channels is alive at a time and dt, z, y are never stored (_ChunkedScan2dLayer).
        b, c, h, w = x.shape
        cfg = dict(b=b, h=h, w=w, e=self.d_inner, n=self.d_state, r=self.dt_rank, padding=self.conv.padding,
                   origin=self.origin, order=self.order, backend=self.last_backend)
        k = _chunk_channels(self.d_inner, b * h * w, self.chunk_channels)
        cfg["slices"] = [slice(i, min(i + k, self.d_inner)) for i in range(0, self.d_inner, k)]
        m = None if mask is None else mask.reshape(b, 1, h * w)
        out = _ChunkedScan2dLayer.apply(
            x.reshape(b, c, h * w), m, self.in_proj.weight, self.conv.weight, self.conv.bias, self.x_proj.weight,
            self.dt_proj.weight, self.dt_proj.bias, self.A_log, self.D, self.out_proj.weight, cfg)
        return out.view(b, c, h, w)

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
