"""Pieces the MIL models share: the patch embedding, gated attention pooling, input checks, init."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..bag import Bag

__all__ = ["GatedAttention", "check_bag", "embedding", "init_linear_"]


def embedding(in_dim: int, dim: int, dropout: float) -> nn.Sequential:
    """Linear(in_dim, dim) - ReLU - Dropout: the per-patch projection of frozen encoder features."""
    layers: list[nn.Module] = [nn.Linear(in_dim, dim), nn.ReLU()]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


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
