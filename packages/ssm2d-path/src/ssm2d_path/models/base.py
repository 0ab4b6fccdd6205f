"""What every MIL model returns, and the base class that fixes the interface."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ..bag import Bag

__all__ = ["MILModel", "MILOutput"]


@dataclass
class MILOutput:
    """logits: (1, n_outputs) for the bag; scores: (N_total,) per-patch scores for heatmaps
    (attention weights before normalisation for attention-pooled models), in the bag's patch order."""

    logits: Tensor
    scores: Tensor


class MILModel(nn.Module):
    """A bag in, an :class:`MILOutput` out. Subclasses set ``in_dim`` and ``n_outputs``."""

    in_dim: int
    n_outputs: int

    def forward(self, bag: Bag) -> MILOutput:  # pragma: no cover - interface
        raise NotImplementedError
