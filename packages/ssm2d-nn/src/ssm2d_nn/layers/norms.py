"""LayerNorms that keep autocast's low precision, on the ssm2d-kernels kernel where it fits.

Under autocast PyTorch runs ``nn.LayerNorm`` in float32 and returns float32, so every norm writes
twice the bytes and turns the residual stream that follows it into float32 (profiled: a third of
M2D-T's bf16 inference time went to LayerNorm). These read and write the autocast dtype instead;
mean and variance are still accumulated in float32 (as timm's ``fast_norm`` does), with the
float32 weight and bias. On CUDA they run :func:`ssm2d_nn.ops.layer_norm` (the ssm2d-kernels
kernel for rows of up to 1024-2048 channels; PyTorch's block-per-row kernel left most threads idle
on these short rows), elsewhere ``torch.nn.functional.layer_norm``; outside autocast they compute
``nn.LayerNorm``'s function (to float32 rounding). Parameters and state-dict keys are those of
``nn.LayerNorm``. They work on the "meta" device and under ``torch.fx`` symbolic tracing (the
norm is one leaf call of the graph, which checks autocast when it runs).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.layer_norm import layer_norm

__all__ = ["LayerNorm", "LayerNorm2d", "layer_norm_lowp"]


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype when autocast is on for ``device_type``, else None (also for device types
    that have no autocast, e.g. "meta")."""
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in ``dtype``; t itself when it already is (a no-op ``.to`` is still an operator call on the
    host: the layers call this on every forward)."""
    return t if t.dtype == dtype else t.to(dtype)


@torch.fx.wrap
def _layer_norm_lowp(x: Tensor, normalized_shape: Tuple[int, ...], weight: Optional[Tensor],
                     bias: Optional[Tensor], eps: float) -> Tensor:
    # A leaf of torch.fx traces (torch.fx.wrap): the autocast state is read when the traced graph
    # runs, not baked in while tracing (where x is a Proxy without a real device).
    dev = x.device.type
    dt = _autocast_dtype(dev)
    if dev == "meta":  # shapes only
        return F.layer_norm(x, normalized_shape, weight, bias, eps)
    if dt is None:
        return layer_norm(x, normalized_shape, weight, bias, eps)
    with torch.autocast(dev, enabled=False):
        return layer_norm(_as_dtype(x, dt), normalized_shape, weight, bias, eps)


def layer_norm_lowp(x: Tensor, norm: nn.LayerNorm) -> Tensor:
    """``norm(x)`` in the autocast dtype when autocast is on for x's device, else plain
    (devices without autocast, such as "meta", always take the plain path)."""
    return _layer_norm_lowp(x, tuple(norm.normalized_shape), norm.weight, norm.bias, norm.eps)


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
