"""LayerNorms that keep autocast's low precision.

Under autocast PyTorch runs ``nn.LayerNorm`` in float32 and returns float32, so every norm writes
twice the bytes and turns the residual stream that follows it into float32 (profiled: a third of
M2D-T's bf16 inference time went to LayerNorm). These read and write the autocast dtype instead;
the kernel still accumulates the mean and variance in float32 (as timm's ``fast_norm`` does).
Outside autocast they are exactly ``nn.LayerNorm``. Parameters and state-dict keys are those of
``nn.LayerNorm``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LayerNorm", "LayerNorm2d", "layer_norm_lowp"]


def layer_norm_lowp(x: Tensor, norm: nn.LayerNorm) -> Tensor:
    """``norm(x)`` in the autocast dtype when autocast is on for x's device, else plain."""
    dev = x.device.type
    if not torch.is_autocast_enabled(dev):
        return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    dt = torch.get_autocast_dtype(dev)
    w = None if norm.weight is None else norm.weight.to(dt)
    b = None if norm.bias is None else norm.bias.to(dt)
    with torch.autocast(dev, enabled=False):
        return F.layer_norm(x.to(dt), norm.normalized_shape, w, b, norm.eps)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last dim that stays in the autocast dtype under autocast."""

    def forward(self, x: Tensor) -> Tensor:
        return layer_norm_lowp(x, self)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) tensor, in the autocast dtype under autocast.

    On a channels-last tensor the permute is free; on a channels-first one F.layer_norm copies it once.
    """

    def forward(self, x: Tensor) -> Tensor:
        return layer_norm_lowp(x.permute(0, 2, 3, 1), self).permute(0, 3, 1, 2)
