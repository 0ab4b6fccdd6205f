"""Mamba2D (M2D) token mixers, channels last: the M2D-SSM mixer and the 2D-RoPE attention mixer.

Both take and return (batch, H, W, C) tensors, like the released Mamba2D blocks, so a stack of
them never changes layout. Parameter names follow the released definition, so checkpoints map
one to one (see ``ssm2d_vision.convert.m2d``).

* :class:`M2DMixer`: ``out_proj(GELU(wavefront2d(GELU(in_proj(x)))))`` plus an optional local path
  ``pwconv2(StarReLU(dwconv3x3(StarReLU(pwconv1(LN(x))))))`` added to it (M2D stages 1-2).
* :class:`RoPEAttention2d`: global multi-head attention with 2D axial rotary position embedding
  and a LayerNorm on q and k after the rotation (M2D stages 3-4).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backends import BACKENDS
from ..ops import star_relu, wavefront2d
from .norms import LayerNorm

__all__ = ["M2DMixer", "RoPEAttention2d", "SepConvLocal", "StarReLU", "axial_rope_cos_sin", "apply_rope"]

_ORIGINS = ("tl", "br")


class StarReLU(nn.Module):
    """``scale * relu(x)**2 + bias`` with learnable scalar ``scale`` (init 1) and ``bias`` (init 0),
    as in MetaFormer. Any shape in, same shape and dtype out."""

    def __init__(self, scale_value: float = 1.0, bias_value: float = 0.0, *, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.scale = nn.Parameter(torch.full((1,), float(scale_value), **dd))
        self.bias = nn.Parameter(torch.full((1,), float(bias_value), **dd))

    def forward(self, x: Tensor) -> Tensor:
        # In x's dtype: the float32 scalars would otherwise promote a bfloat16 activation to float32
        # under autocast (twice the memory traffic, and a cast back before the next conv/linear).
        # On CUDA one fused pass (ssm2d_nn.ops.star_relu), elsewhere the PyTorch formula.
        return star_relu(x, self.scale, self.bias)


class SepConvLocal(nn.Module):
    """MobileNetV2-style inverted separable conv on channels-last input, no biases:
    Linear(C, rC) -> StarReLU -> depthwise kxk -> StarReLU -> Linear(rC, C).

    (batch, H, W, C) -> (batch, H, W, C). The depthwise conv runs on a channels-last-strided NCHW
    view of the same memory, so no layout copy is made.
    """

    def __init__(self, dim: int, expansion_ratio: int = 2, kernel_size: int = 3, *, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        med = int(expansion_ratio * dim)
        self.pwconv1 = nn.Linear(dim, med, bias=False, **dd)
        self.act1 = StarReLU(**dd)
        self.dwconv = nn.Conv2d(med, med, kernel_size, padding=kernel_size // 2, groups=med, bias=False, **dd)
        self.act2 = StarReLU(**dd)
        self.pwconv2 = nn.Linear(med, dim, bias=False, **dd)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act1(self.pwconv1(x))
        x = self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.pwconv2(self.act2(x))


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


class M2DMixer(nn.Module):
    """The Mamba2D token mixer (M2D-SSM plus the local SepConv path), channels last.

    SSM path, with u = GELU(in_proj(x)) of d_inner = expand * dim channels::

        [rT, rL, BT, BL, C] = x_proj(u)                       (no bias; dt_rank, dt_rank, N, N, N)
        dT = softplus(dt_projT(rT)),  dL = softplus(dt_projL(rL))
        y  = wavefront2d(u, dT, dL, -exp(AT_log), -exp(AL_log), BT, BL, C, D, origin)
        out = out_proj(GELU(y))  (+ local path)

    The scan from the bottom-right ("br") equals the released flip-scan-flip: every other op of the
    mixer is per cell, so the origin can move into the scan instead of two flips of the tensor.

    Args:
        dim: channels C.  d_state: N (16).  expand: d_inner / C (1).  dt_rank: "auto" = ceil(C/16).
        local_path: add the LN + SepConv local path.  origin: "tl" or "br".
        backend: the wavefront2d backend ("auto", "kernel", "reference").

    Shapes: (batch, H, W, C) -> (batch, H, W, C). Activation memory of the forward is a few
    (batch, H, W, d_inner) tensors; the scan never stores its (..., N) hidden state.
    """

    def __init__(self, dim: int, d_state: int = 16, expand: int = 1, dt_rank="auto", *, local_path: bool = True,
                 origin: str = "tl", backend: str = "auto", dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, dt_scale: float = 1.0, device=None, dtype=None):
        super().__init__()
        if origin not in _ORIGINS:
            raise ValueError(f"origin must be one of {_ORIGINS}, got {origin!r}")
        if dim < 1 or d_state < 1 or expand < 1:
            raise ValueError(f"dim, d_state and expand must be positive, got {dim}, {d_state}, {expand}")
        dd = dict(device=device, dtype=dtype)
        self.dim, self.d_state, self.d_inner = dim, d_state, expand * dim
        self.dt_rank = math.ceil(dim / 16) if dt_rank == "auto" else int(dt_rank)
        self.origin = origin
        self.backend = _check_backend(backend)
        self._dt = (dt_min, dt_max, dt_init_floor, dt_scale)
        e, n, r = self.d_inner, d_state, self.dt_rank

        self.local_norm = LayerNorm(dim, **dd) if local_path else None
        self.local_path = SepConvLocal(dim, 2, 3, **dd) if local_path else None
        self.in_proj = nn.Linear(dim, e, **dd)
        self.x_proj = nn.Linear(e, 2 * r + 3 * n, bias=False, **dd)
        self.dt_projT = nn.Linear(r, e, **dd)
        self.dt_projL = nn.Linear(r, e, **dd)
        self.AT_log = nn.Parameter(torch.empty(e, n, **dd))
        self.AL_log = nn.Parameter(torch.empty(e, n, **dd))
        self.D = nn.Parameter(torch.empty(e, **dd))
        for p in (self.AT_log, self.AL_log, self.D):
            p._no_weight_decay = True
        self.out_proj = nn.Linear(e, dim, **dd)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Mamba's initialisation: dt_proj weights U(+-dt_rank^-0.5 * dt_scale), biases the inverse
        softplus of dt ~ logU(dt_min, dt_max) (one draw shared by T and L, as released),
        A_log = log(1..N) for both directions, D = 1."""
        dt_min, dt_max, floor, dt_scale = self._dt
        dev = self.D.device
        std = self.dt_rank ** -0.5 * dt_scale
        for proj in (self.dt_projT, self.dt_projL):
            nn.init.uniform_(proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner, device=dev) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=floor)
        inv_dt = dt + torch.log(-torch.expm1(-dt))
        self.dt_projT.bias.copy_(inv_dt)
        self.dt_projL.bias.copy_(inv_dt)
        a_log = torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32, device=dev))
        self.AT_log.copy_(a_log.expand(self.d_inner, -1))
        self.AL_log.copy_(a_log.expand(self.d_inner, -1))
        self.D.fill_(1.0)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, d_inner={self.d_inner}, d_state={self.d_state}, dt_rank={self.dt_rank}, "
                f"origin={self.origin!r}, backend={self.backend!r}")

    def scan_inputs(self, u: Tensor):
        """(dT, dL, BT, BL, C) for u (batch, H, W, d_inner); views where they can be (no copies)."""
        r, n, e = self.dt_rank, self.d_state, self.d_inner
        xdbl = self.x_proj(u)  # (b, H, W, 2r + 3N)
        # dt_projT and dt_projL as one block-diagonal GEMM + one softplus (half the small kernels).
        w = torch.block_diag(self.dt_projT.weight, self.dt_projL.weight)
        bias = torch.cat([self.dt_projT.bias, self.dt_projL.bias])
        dt = F.softplus(F.linear(xdbl[..., : 2 * r], w.to(xdbl.dtype), bias.to(xdbl.dtype))).to(u.dtype)
        bt, bl, c = xdbl[..., 2 * r:].to(u.dtype).split(n, dim=-1)
        return dt[..., :e], dt[..., e:], bt, bl, c

    def ssm(self, u: Tensor) -> Tensor:
        """The scan of u (batch, H, W, d_inner) -> (batch, H, W, d_inner)."""
        dT, dL, bt, bl, c = self.scan_inputs(u)
        # A in float32 whatever the autocast dtype (float64 kept for the float64 reference path).
        pdt = torch.float64 if self.AT_log.dtype == torch.float64 else torch.float32
        AT = -torch.exp(self.AT_log.to(pdt))
        AL = -torch.exp(self.AL_log.to(pdt))
        return wavefront2d(u, dT, dL, AT, AL, bt, bl, c, self.D, origin=self.origin, backend=self.backend)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"M2DMixer: x must have shape (batch, H, W, {self.dim}), got {tuple(x.shape)}")
        y = self.out_proj(F.gelu(self.ssm(F.gelu(self.in_proj(x)))))
        if self.local_path is not None:
            y = y + self.local_path(self.local_norm(x))
        return y


def axial_rope_cos_sin(height: int, width: int, head_dim: int, base: float = 10000.0, *,
                       device=None, dtype=torch.float32) -> tuple[Tensor, Tensor]:
    """cos, sin tables (H*W, head_dim) of the released 2D axial RoPE, rows in row-major cell order.

    The first head_dim/2 channels rotate by the row index i, the next head_dim/2 by the column index
    j; within each half, channel pair (2k, 2k+1) turns by angle pos * base**(-k / (head_dim/4)).
    Computed in float32 (as released; float64 for a float64 ``dtype``), then cast to ``dtype``.
    """
    if head_dim % 4:
        raise ValueError(f"head_dim must be a multiple of 4 for 2D axial RoPE, got {head_dim}")
    half = head_dim // 2
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = 1.0 / (base ** (torch.arange(half // 2, device=device, dtype=acc) / (half // 2)))
    i = torch.arange(height, device=device, dtype=acc).repeat_interleave(width)
    j = torch.arange(width, device=device, dtype=acc).repeat(height)
    ang = torch.cat([i[:, None] * inv_freq, j[:, None] * inv_freq], dim=-1).repeat_interleave(2, dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotates channel pairs (2k, 2k+1) of x's last dim: x*cos + rot(x)*sin, rot(a, b) = (-b, a).
    cos/sin broadcast against x."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    rot = torch.stack((-x2, x1), dim=-1).flatten(-2)
    return x * cos + rot * sin


class RoPEAttention2d(nn.Module):
    """Global self-attention over all H*W cells with 2D axial RoPE and QK LayerNorm, channels last.

    qkv = Linear(C, 3*heads*head_dim) (features ordered q | k | v, each heads x head_dim), RoPE on
    q and k (all head channels: first half rows, second half columns), then LayerNorm(head_dim) on q
    and k (after the rotation, as released), scaled dot-product attention with scale
    head_dim**-0.5 (``F.scaled_dot_product_attention``), proj = Linear(heads*head_dim, C).
    heads = max(1, C // head_dim). RoPE tables are built for the actual grid and cached per
    (H, W, device, dtype).

    Shapes: (batch, H, W, C) -> (batch, H, W, C). Memory: that of SDPA on (batch, heads, H*W, head_dim).
    """

    def __init__(self, dim: int, head_dim: int = 32, num_heads: Optional[int] = None, qkv_bias: bool = False,
                 proj_bias: bool = False, rope_base: float = 10000.0, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, *, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.dim, self.head_dim = dim, head_dim
        self.num_heads = num_heads if num_heads is not None else max(1, dim // head_dim)
        self.attn_dim = self.num_heads * head_dim
        self.scale = head_dim ** -0.5
        self.rope_base = rope_base
        self.attn_drop = attn_drop
        if head_dim % 4:
            raise ValueError(f"head_dim must be a multiple of 4 for 2D axial RoPE, got {head_dim}")
        self.qkv = nn.Linear(dim, 3 * self.attn_dim, bias=qkv_bias, **dd)
        self.q_norm = LayerNorm(head_dim, **dd)
        self.k_norm = LayerNorm(head_dim, **dd)
        self.proj = nn.Linear(self.attn_dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self._rope_cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, rope_base={self.rope_base}"

    def rope(self, height: int, width: int, device, dtype) -> tuple[Tensor, Tensor]:
        """cos, sin (H*W, 1, 1, head_dim), cached (not while tracing: constants are folded there)."""
        key = (height, width, device, dtype)
        if torch.compiler.is_compiling():
            cos, sin = axial_rope_cos_sin(height, width, self.head_dim, self.rope_base, device=device, dtype=dtype)
            return cos[:, None, None], sin[:, None, None]
        hit = self._rope_cache.get(key)
        if hit is None:
            if len(self._rope_cache) >= 16:
                self._rope_cache.clear()
            cos, sin = axial_rope_cos_sin(height, width, self.head_dim, self.rope_base, device=device, dtype=dtype)
            hit = self._rope_cache[key] = (cos[:, None, None], sin[:, None, None])
        return hit

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"RoPEAttention2d: x must have shape (batch, H, W, {self.dim}), got {tuple(x.shape)}")
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, self.head_dim)
        cos, sin = self.rope(h, w, x.device, qkv.dtype)
        qk = apply_rope(qkv[:, :, :2], cos, sin)  # q and k rotated together: (b, L, 2, heads, hd)
        q = self.q_norm(qk[:, :, 0]).transpose(1, 2)
        k = self.k_norm(qk[:, :, 1]).transpose(1, 2)
        v = qkv[:, :, 2].transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0,
                                             scale=self.scale)
        out = out.transpose(1, 2).reshape(b, h, w, self.attn_dim)
        return self.proj_drop(self.proj(out))
