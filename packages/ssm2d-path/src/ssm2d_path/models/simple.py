"""Attention-based MIL (ABMIL, gated) and the mean / max pooling baselines."""

from __future__ import annotations

import torch
from torch import nn

from ..bag import Bag
from .base import MILModel, MILOutput
from .common import GatedAttention, check_bag, embedding, init_linear_

__all__ = ["ABMIL", "MaxMIL", "MeanMIL"]


class ABMIL(MILModel):
    """Gated attention MIL (Ilse et al. 2018): Linear(in_dim, dim) - ReLU - dropout, gated attention
    (V, U: Linear(dim, attn_dim); w: Linear(attn_dim, 1)), softmax over all patches of the bag,
    classifier Linear(dim, n_outputs). Scores: the attention logits (before the softmax)."""

    scan_backend = None

    def __init__(self, in_dim: int, n_outputs: int, dim: int = 512, attn_dim: int = 128, dropout: float = 0.25):
        super().__init__()
        self.in_dim, self.n_outputs = in_dim, n_outputs
        self.embed = embedding(in_dim, dim, dropout)
        self.pool = GatedAttention(dim, attn_dim)
        self.classifier = nn.Linear(dim, n_outputs)
        init_linear_(self)

    def forward(self, bag: Bag) -> MILOutput:
        check_bag(self, bag)
        h = self.embed(bag.features)
        scores, pooled = self.pool(h)
        return MILOutput(self.classifier(pooled)[None], scores)


class _InstanceMIL(MILModel):
    """Shared body of MeanMIL / MaxMIL: per-patch logits classifier(embed(x)) (N, n_outputs)."""

    scan_backend = None

    def __init__(self, in_dim: int, n_outputs: int, dim: int = 512, dropout: float = 0.25):
        super().__init__()
        self.in_dim, self.n_outputs = in_dim, n_outputs
        self.embed = embedding(in_dim, dim, dropout)
        self.classifier = nn.Linear(dim, n_outputs)
        init_linear_(self)

    def _pool(self, patch_logits):  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, bag: Bag) -> MILOutput:
        check_bag(self, bag)
        patch_logits = self.classifier(self.embed(bag.features))
        logits = self._pool(patch_logits)[None]
        # the per-patch logit of the class the bag predicts: what each patch says about the decision
        scores = patch_logits[:, int(logits.argmax(dim=1))]
        return MILOutput(logits, scores)


class MeanMIL(_InstanceMIL):
    """Mean pooling: bag logits = mean of the per-patch logits (= classifier of the mean feature).
    Scores: each patch's logit of the predicted class."""

    def _pool(self, patch_logits):
        return patch_logits.mean(dim=0)


class MaxMIL(_InstanceMIL):
    """Max pooling: bag logit of each output = the max over patches of that per-patch logit.
    Scores: each patch's logit of the predicted class (the max-scoring patch sets the bag logit)."""

    def _pool(self, patch_logits):
        return patch_logits.max(dim=0).values
