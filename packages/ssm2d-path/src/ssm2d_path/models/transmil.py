"""TransMIL (Shao et al. 2021): two Nystrom-attention layers around a PPEG positional encoder.

The sequence is the bag's patches in bag order (TransMIL does not use coordinates), squared up to
ceil(sqrt(N))^2 tokens by repeating the first patches, with a CLS token in front. Nystrom attention
is implemented here (Xiong et al. 2021): landmarks are means of consecutive token segments, the
landmark kernel is inverted by the iterative Moore-Penrose scheme, and a depthwise convolution over
the sequence (kernel 33) of the values is added.

Memory: O(N * landmarks * heads) for the attention kernels (N = patches): at 150k patches, 256
landmarks and 8 heads one (heads, N, landmarks) float32 matrix is ~1.2 GB, and the layer keeps a few.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..bag import Bag
from .base import MILModel, MILOutput
from .common import check_bag, init_linear_

__all__ = ["NystromAttention", "PPEG", "TransMIL", "iterative_pinv"]


def iterative_pinv(x: Tensor, iters: int = 6) -> Tensor:
    """Moore-Penrose pseudo-inverse of (..., m, m) by the iteration of Razavi et al. (as Nystromformer):
    Z0 = x^T / (max row sum * max column sum), Z <- Z/4 (13I - xZ(15I - xZ(7I - xZ)))."""
    absx = x.abs()
    z = x.transpose(-1, -2) / (absx.sum(-1).max() * absx.sum(-2).max())
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    for _ in range(iters):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


class NystromAttention(nn.Module):
    """Multi-head Nystrom self-attention on (B, n, dim).

    The sequence is zero-padded in front to a multiple of ``num_landmarks`` (n -> L = m*l); landmarks
    are the means of l consecutive queries/keys; out = softmax(Q K~^T) pinv(softmax(Q~ K~^T))
    softmax(Q~ K^T) V (+ depthwise conv over the sequence of V, kernel ``residual_kernel``).
    forward(x, return_cls_attention=False) -> out (B, n, dim)[, cls (B, heads, n)]: the approximate
    attention row of token 0 of the unpadded input (the CLS token) over all n tokens.
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, num_landmarks: int = 256,
                 pinv_iterations: int = 6, residual: bool = True, residual_kernel: int = 33, dropout: float = 0.0):
        super().__init__()
        self.heads, self.dim_head, self.num_landmarks, self.pinv_iterations = heads, dim_head, num_landmarks, pinv_iterations
        self.scale = dim_head ** -0.5
        inner = heads * dim_head
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))
        self.res_conv = (nn.Conv2d(heads, heads, (residual_kernel, 1), padding=(residual_kernel // 2, 0),
                                   groups=heads, bias=False) if residual else None)

    def forward(self, x: Tensor, return_cls_attention: bool = False):
        b, n, _ = x.shape
        m, hds = self.num_landmarks, self.heads
        pad = (m - n % m) % m
        if pad:
            x = F.pad(x, (0, 0, pad, 0))
        L = n + pad
        seg = L // m
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, L, hds, self.dim_head).transpose(1, 2) for t in (q, k, v))  # (b, h, L, d)
        q = q * self.scale
        q_land = q.reshape(b, hds, m, seg, self.dim_head).mean(3)
        k_land = k.reshape(b, hds, m, seg, self.dim_head).mean(3)
        attn1 = (q @ k_land.transpose(-1, -2)).softmax(-1)       # (b, h, L, m)
        attn2 = (q_land @ k_land.transpose(-1, -2)).softmax(-1)  # (b, h, m, m)
        attn3 = (q_land @ k.transpose(-1, -2)).softmax(-1)       # (b, h, m, L)
        # the pseudo-inverse iteration is ill-suited to bf16: run it in float32
        attn2_inv = iterative_pinv(attn2 if attn2.dtype == torch.float64 else attn2.float(),
                                   self.pinv_iterations).to(attn1.dtype)
        out = (attn1 @ attn2_inv) @ (attn3 @ v)
        if self.res_conv is not None:
            out = out + self.res_conv(v)
        out = self.to_out(out.transpose(1, 2).reshape(b, L, hds * self.dim_head))[:, -n:]
        if not return_cls_attention:
            return out
        cls = (attn1[:, :, pad:pad + 1] @ attn2_inv) @ attn3  # (b, h, 1, L)
        return out, cls[:, :, 0, pad:]


class PPEG(nn.Module):
    """Pyramid position encoding: x + dw7x7(x) + dw5x5(x) + dw3x3(x) on the square token grid
    (the CLS token is passed through). forward(x (B, 1 + H*W, dim), H, W)."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.proj1 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.proj2 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        b, _, c = x.shape
        cls, feat = x[:, :1], x[:, 1:]
        grid = feat.transpose(1, 2).reshape(b, c, h, w)
        grid = grid + self.proj(grid) + self.proj1(grid) + self.proj2(grid)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)


class TransLayer(nn.Module):
    """x + NystromAttention(LayerNorm(x)) with heads 8, dim_head dim/8, landmarks dim/2, 6 pinv
    iterations, residual conv 33, dropout 0.1 (TransMIL's setting)."""

    def __init__(self, dim: int, heads: int = 8, dropout: float = 0.1):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim, heads=heads, dim_head=dim // heads, num_landmarks=dim // 2,
                                     pinv_iterations=6, residual=True, residual_kernel=33, dropout=dropout)

    def forward(self, x: Tensor, return_cls_attention: bool = False):
        if return_cls_attention:
            out, cls = self.attn(self.norm(x), return_cls_attention=True)
            return x + out, cls
        return x + self.attn(self.norm(x))


class TransMIL(MILModel):
    """TransMIL: Linear(in_dim, dim) - ReLU (- dropout if > 0), CLS token, TransLayer, PPEG,
    TransLayer, LayerNorm, classifier on the CLS token. Scores: the last layer's CLS attention to each
    patch, averaged over heads (for a patch repeated by the square padding, its first position)."""

    scan_backend = None

    def __init__(self, in_dim: int, n_outputs: int, dim: int = 512, dropout: float = 0.0, heads: int = 8):
        super().__init__()
        self.in_dim, self.n_outputs = in_dim, n_outputs
        fc: list[nn.Module] = [nn.Linear(in_dim, dim), nn.ReLU()]
        if dropout > 0:
            fc.append(nn.Dropout(dropout))
        self.embed = nn.Sequential(*fc)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.cls_token._no_weight_decay = True
        self.layer1 = TransLayer(dim, heads)
        self.pos_layer = PPEG(dim)
        self.layer2 = TransLayer(dim, heads)
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, n_outputs)
        init_linear_(self.embed, self.classifier)

    def forward(self, bag: Bag) -> MILOutput:
        check_bag(self, bag)
        h = self.embed(bag.features)[None]  # (1, N, dim)
        n = h.shape[1]
        side = math.ceil(math.sqrt(n))
        extra = side * side - n
        if extra:
            # repeat the first patches to fill the square, as TransMIL does (cyclically if needed)
            reps = torch.arange(extra, device=h.device) % n
            h = torch.cat([h, h[:, reps]], dim=1)
        h = torch.cat([self.cls_token.expand(1, -1, -1).to(h.dtype), h], dim=1)
        h = self.layer1(h)
        h = self.pos_layer(h, side, side)
        h, cls = self.layer2(h, return_cls_attention=True)
        logits = self.classifier(self.norm(h)[:, 0])
        scores = cls[0].mean(0)[1:1 + n]
        return MILOutput(logits, scores)
