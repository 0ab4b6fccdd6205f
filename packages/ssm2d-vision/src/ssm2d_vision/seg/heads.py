"""UperNet and FCN decode heads in plain PyTorch.

The structure (and so the math) is that of mmsegmentation's ``UPerHead`` and ``FCNHead`` with
BatchNorm + ReLU conv modules and ``align_corners=False``, so the weights of one can be loaded into
the other (:func:`convert_mmseg_head_state_dict` maps the names).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvBNReLU", "PyramidPooling", "UperNetHead", "FCNHead", "convert_mmseg_head_state_dict"]


def _resize(x: torch.Tensor, size, align_corners: bool) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


class ConvBNReLU(nn.Sequential):
    """Conv2d (no bias: the BatchNorm after it has one) -> BatchNorm2d -> ReLU.

    (B, in_channels, H, W) -> (B, out_channels, H', W'), H' = H for the usual odd kernel with
    ``padding = kernel_size // 2``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, padding: int = 0,
                 dilation: int = 1):
        super().__init__(OrderedDict(
            conv=nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation,
                           bias=False),
            bn=nn.BatchNorm2d(out_channels),
            act=nn.ReLU(inplace=True),
        ))


class PyramidPooling(nn.ModuleList):
    """The pooling pyramid of PSPNet: per scale s, adaptive average pooling to (s, s), a 1x1
    ConvBNReLU, and bilinear upsampling back to the input size.

    (B, in_channels, H, W) -> list of len(pool_scales) maps (B, channels, H, W).
    """

    def __init__(self, pool_scales: Sequence[int], in_channels: int, channels: int,
                 align_corners: bool = False):
        super().__init__(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(in_channels, channels, 1)) for s in pool_scales
        )
        self.align_corners = align_corners

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [_resize(stage(x), x.shape[2:], self.align_corners) for stage in self]


def _check_channels(arg: str, channels) -> tuple[int, ...]:
    if isinstance(channels, int):
        channels = (channels,)
    channels = tuple(channels)
    if not channels or not all(isinstance(c, int) and c > 0 for c in channels):
        raise ValueError(f"{arg} must be positive ints, got {channels!r}")
    return channels


def _check_features(features: Sequence[torch.Tensor], in_channels: tuple[int, ...], who: str) -> None:
    if len(features) != len(in_channels):
        raise ValueError(f"{who} expects {len(in_channels)} feature maps, got {len(features)}")
    for i, (f, c) in enumerate(zip(features, in_channels)):
        if f.dim() != 4 or f.shape[1] != c:
            raise ValueError(f"{who}: feature {i} must be (B, {c}, H, W), got {tuple(f.shape)}")


class UperNetHead(nn.Module):
    """UperNet decode head (Xiao et al., 2018): a pyramid pooling module on the coarsest map and an
    FPN over all maps, fused at the finest resolution.

    Args:
        in_channels: channels of the backbone maps, finest first, e.g. (96, 192, 384, 768).
        num_classes: output classes.
        channels: width of every internal map (512 in the UperNet papers' configs).
        pool_scales: output sizes of the pyramid pooling (1, 2, 3, 6).
        dropout: channel dropout (``Dropout2d``) before the classifier.
        align_corners: of every bilinear resize.

    Input: a sequence of maps (B, in_channels[i], H_i, W_i), finest first (strides 4/8/16/32).
    Output: logits (B, num_classes, H_0, W_0) at the finest map's resolution.
    Memory: the fused map before the bottleneck is (B, len(in_channels) * channels, H_0, W_0).
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1, align_corners: bool = False):
        super().__init__()
        self.in_channels = _check_channels("in_channels", in_channels)
        if len(self.in_channels) < 2:
            raise ValueError(f"in_channels needs at least 2 levels for the FPN, got {self.in_channels}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = num_classes
        self.channels = channels
        self.align_corners = align_corners
        top = self.in_channels[-1]
        self.ppm = PyramidPooling(pool_scales, top, channels, align_corners)
        self.ppm_bottleneck = ConvBNReLU(top + len(pool_scales) * channels, channels, 3, padding=1)
        self.lateral_convs = nn.ModuleList(ConvBNReLU(c, channels, 1) for c in self.in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvBNReLU(channels, channels, 3, padding=1) for _ in self.in_channels[:-1])
        self.fpn_bottleneck = ConvBNReLU(len(self.in_channels) * channels, channels, 3, padding=1)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        _init_head(self)

    def forward_features(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Maps (B, in_channels[i], H_i, W_i) -> fused map (B, channels, H_0, W_0) before the classifier."""
        _check_features(features, self.in_channels, "UperNetHead")
        top = features[-1]
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features)]
        laterals.append(self.ppm_bottleneck(torch.cat([top, *self.ppm(top)], dim=1)))
        # Top-down pathway: each level adds the upsampled coarser one (not in place: autograd).
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[2:], self.align_corners)
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals)]
        outs.append(laterals[-1])
        size = outs[0].shape[2:]
        outs = [outs[0]] + [_resize(o, size, self.align_corners) for o in outs[1:]]
        return self.fpn_bottleneck(torch.cat(outs, dim=1))

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Maps, finest first -> logits (B, num_classes, H_0, W_0)."""
        return self.classifier(self.dropout(self.forward_features(features)))


class FCNHead(nn.Module):
    """FCN head, used as UperNet's auxiliary head on stage 3 (mmseg configs: 256 channels, one
    3x3 conv, no input concatenation, loss weight 0.4).

    Args:
        in_channels: channels of the one input map.
        num_classes: output classes.
        channels: width of the convs.
        num_convs: number of ConvBNReLU (>= 1).
        kernel_size: of those convs.
        concat_input: concatenate the input to the conv output (one more conv) before classifying.
        dropout: ``Dropout2d`` before the classifier.

    Input (B, in_channels, H, W) (or a sequence of maps together with ``in_index``) -> logits
    (B, num_classes, H, W).
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, num_convs: int = 1,
                 kernel_size: int = 3, concat_input: bool = False, dropout: float = 0.1,
                 in_index: int | None = None):
        super().__init__()
        if num_convs < 1:
            raise ValueError(f"num_convs must be >= 1, got {num_convs}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        (self.in_channels,) = _check_channels("in_channels", in_channels)
        self.in_index = in_index
        pad = kernel_size // 2
        self.convs = nn.Sequential(*[
            ConvBNReLU(self.in_channels if i == 0 else channels, channels, kernel_size, padding=pad)
            for i in range(num_convs)
        ])
        self.conv_cat = (ConvBNReLU(self.in_channels + channels, channels, kernel_size, padding=pad)
                         if concat_input else None)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        _init_head(self)

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            if self.in_index is None:
                raise ValueError("FCNHead got a sequence of maps but no in_index to pick one")
            x = x[self.in_index]
        _check_features([x], (self.in_channels,), "FCNHead")
        out = self.convs(x)
        if self.conv_cat is not None:
            out = self.conv_cat(torch.cat([x, out], dim=1))
        return self.classifier(self.dropout(out))


def _init_head(head: nn.Module) -> None:
    """mmseg's initialisation: Kaiming-normal (fan_out, ReLU) convs, unit BN, classifier N(0, 0.01)."""
    for m in head.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    nn.init.normal_(head.classifier.weight, std=0.01)
    nn.init.zeros_(head.classifier.bias)


# mmseg name -> ours, as prefixes (ConvModule's `activate` has no parameters).
_MMSEG_PREFIXES = [
    ("conv_seg.", "classifier."),
    ("psp_modules.", "ppm."),
    ("bottleneck.", "ppm_bottleneck."),
]


def convert_mmseg_head_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renames an mmseg ``UPerHead`` / ``FCNHead`` state dict (``decode_head.*`` or
    ``auxiliary_head.*`` prefix already stripped) to :class:`UperNetHead` / :class:`FCNHead` names.

    mmseg's ConvModule keys ``conv.weight`` / ``bn.*`` are kept as they are; only module names
    differ. Loss-module entries (none have parameters) are dropped.
    """
    out = {}
    for key, value in state_dict.items():
        if key.startswith("loss_"):
            continue
        new = key
        for old_prefix, new_prefix in _MMSEG_PREFIXES:
            if key.startswith(old_prefix):
                new = new_prefix + key[len(old_prefix):]
                break
        out[new] = value
    return out
