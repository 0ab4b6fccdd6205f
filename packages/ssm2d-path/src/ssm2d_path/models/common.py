"""Pieces the MIL models share: the patch embedding, gated attention pooling, input checks, init."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..bag import Bag

__all__ = ["GatedAttention", "check_bag", "embed_patches", "embedding", "init_linear_", "relu_dropout"]


def embedding(in_dim: int, dim: int, dropout: float) -> nn.Sequential:
    """Linear(in_dim, dim) - ReLU - Dropout: the per-patch projection of frozen encoder features."""
    layers: list[nn.Module] = [nn.Linear(in_dim, dim), nn.ReLU()]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class _ReluDropout(torch.autograd.Function):
    """relu(v) * keep / (1 - p) saving only its output: where the output is > 0 the gradient is
    1 / (1 - p), elsewhere (v <= 0 or dropped) it is 0, so neither ReLU's output nor dropout's mask
    is kept, and the output is usually saved by the next op anyway (N x dim instead of 2 N x dim
    plus a N x dim bool mask)."""

    @staticmethod
    def forward(ctx, v: Tensor, keep: Optional[Tensor], scale: float) -> Tensor:
        out = torch.relu(v)
        if keep is not None:
            out = out.mul_(keep).mul_(scale)
        ctx.save_for_backward(out)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        (out,) = ctx.saved_tensors
        return grad * (out > 0).to(grad.dtype) * ctx.scale, None, None


def relu_dropout(v: Tensor, p: float, training: bool, keep: Optional[Tensor] = None) -> Tensor:
    """``dropout(relu(v), p, training)`` with one saved tensor (its output). ``keep`` (v's shape,
    bool) fixes the dropout mask; by default it is drawn as nn.Dropout draws it (bernoulli(1 - p))."""
    if not training or p == 0.0:
        keep, scale = None, 1.0
    elif p >= 1.0:
        return torch.zeros_like(v).requires_grad_(v.requires_grad)
    else:
        scale = 1.0 / (1.0 - p)
        if keep is None:
            keep = torch.empty_like(v, dtype=torch.bool).bernoulli_(1.0 - p)
    return _ReluDropout.apply(v, keep, scale)


class _RecastLinear(torch.autograd.Function):
    """``linear(x.to(dtype), weight.to(dtype), bias.to(dtype))`` (what autocast runs) saving ``x``
    itself, not its low-precision copy: the backward casts x again for the weight gradient. Costs
    two casting passes over x (one per direction) and keeps no N x in_dim copy between forward and
    backward (293 MiB at 150k x 1024 in bf16)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], dtype: torch.dtype) -> Tensor:
        w = weight.to(dtype)
        ctx.save_for_backward(x, w)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return F.linear(x.to(dtype), w, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, w = ctx.saved_tensors
        wdt, bdt = ctx.dtypes
        dx = (grad @ w).to(x.dtype) if ctx.needs_input_grad[0] else None
        dw = (grad.t() @ x.to(grad.dtype)).to(wdt) if ctx.needs_input_grad[1] else None
        db = grad.sum(0, dtype=torch.float32).to(bdt) if bdt is not None and ctx.needs_input_grad[2] else None
        return dx, dw, db, None


def _recast_pays(x: Tensor) -> bool:
    """The low-precision GEMM plus two casts of x beats a float32 GEMM: on CUDA without TF32 (a
    float32 GEMM without TF32 runs on the CUDA cores, several times slower than the tensor cores'
    bf16 one; with TF32 allowed it is about as fast as the casts alone)."""
    return x.is_cuda and not torch.backends.cuda.matmul.allow_tf32


def embed_patches(embed: nn.Sequential, x: Tensor) -> Tensor:
    """Runs an :func:`embedding` (Linear - ReLU - Dropout) on (N, in_dim) features -> (N, dim).

    Under autocast with features in the Linear's dtype, autocast would save a bf16 copy of the
    features for the weight gradient (N x in_dim x 2 bytes, 293 MiB at 150k x 1024). Instead, on
    CUDA without TF32 the Linear runs in autocast's dtype through :class:`_RecastLinear` (saves x
    itself, casts it again in the backward; output in autocast's dtype), elsewhere in the Linear's
    own dtype with autocast off (the plain Linear keeps a reference to x; output in that dtype).
    ReLU and dropout are fused (:func:`relu_dropout`).
    """
    linear = embed[0]
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.dtype == linear.weight.dtype:
        if _recast_pays(x):
            v = _RecastLinear.apply(x, linear.weight, linear.bias, torch.get_autocast_dtype(dev))
        else:
            with torch.autocast(dev, enabled=False):
                v = linear(x)
    else:
        v = linear(x)
    drop = embed[2] if len(embed) > 2 else None
    return relu_dropout(v, drop.p if drop is not None else 0.0, drop is not None and drop.training)


def init_linear_(*modules: nn.Module) -> None:
    """Xavier-normal weights and zero biases for the Linear layers of the given modules (the CLAM
    convention for MIL heads). Applied to heads only: the SSM layers keep their own init."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


def check_bag(model: nn.Module, bag: Bag) -> None:
    if not isinstance(bag, Bag):
        raise TypeError(f"{type(model).__name__}: expected a ssm2d_path.bag.Bag, got {type(bag).__name__}")
    if bag.feature_dim != model.in_dim:
        raise ValueError(f"{type(model).__name__}: bag {bag.bag_id!r} has features of dimension {bag.feature_dim}, "
                         f"the model was built for in_dim={model.in_dim}")


class GatedAttention(nn.Module):
    """Gated attention pooling (Ilse et al. 2018): a_i = w^T (tanh(V h_i) * sigmoid(U h_i)) + b,
    weights = softmax(a) over the bag's patches, pooled = sum_i weights_i h_i.

    forward(h (N, dim)) -> (logits a (N,), pooled (dim,)). Softmax in float32 (float64 for float64).
    """

    def __init__(self, dim: int, hidden: int = 128, dropout: float = 0.0):
        super().__init__()
        self.attention_v = nn.Linear(dim, hidden)
        self.attention_u = nn.Linear(dim, hidden)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.attention_w = nn.Linear(hidden, 1)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        gated = torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))
        logits = self.attention_w(self.dropout(gated)).squeeze(-1)
        weights = F.softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=0)
        pooled = weights.to(h.dtype) @ h
        return logits, pooled
