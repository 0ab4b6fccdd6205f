"""A segmentation model: any timm ``features_only`` backbone + UperNet (+ an FCN auxiliary head)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .heads import FCNHead, UperNetHead

__all__ = ["SegModel"]

IGNORE_INDEX = 255


class SegModel(nn.Module):
    """Backbone -> decode head (-> auxiliary head), logits upsampled to the input size.

    Args:
        backbone: a module mapping images (B, 3, H, W) to a list of maps, finest first, e.g. a
            ``timm.create_model(name, features_only=True)`` model (strides 4/8/16/32).
        head: the decode head (e.g. :class:`UperNetHead`) taking that list.
        aux_head: optional auxiliary head (e.g. :class:`FCNHead`) on ``features[aux_index]``,
            used only in training.
        aux_index: which backbone map feeds the auxiliary head (2 = stage 3, stride 16).
        aux_weight: weight of the auxiliary loss (0.4 in the UperNet configs).
        ignore_index: label ignored by the loss (255, as in mmseg's ADE20K pipeline).
        align_corners: of the final bilinear upsampling.

    ``forward(x)`` with x (B, 3, H, W) returns logits (B, num_classes, H, W); in training mode,
    with an auxiliary head, it returns ``(logits, aux_logits)``, both (B, num_classes, H, W).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, aux_head: nn.Module | None = None, *,
                 aux_index: int = 2, aux_weight: float = 0.4, ignore_index: int = IGNORE_INDEX,
                 align_corners: bool = False):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.aux_head = aux_head
        self.aux_index = aux_index
        self.aux_weight = aux_weight
        self.ignore_index = ignore_index
        self.align_corners = align_corners

    @classmethod
    def from_timm(cls, name: str, num_classes: int, *, pretrained: bool = False,
                  out_indices: Sequence[int] = (-4, -3, -2, -1), channels: int = 512, aux: bool = True,
                  aux_channels: int = 256, aux_index: int = 2, aux_weight: float = 0.4, dropout: float = 0.1,
                  drop_path_rate: float | None = None, **backbone_kwargs) -> SegModel:
        """Builds ``timm.create_model(name, features_only=True, out_indices=...)`` + UperNet + FCN aux.

        ``out_indices`` default: the last four feature levels (strides 4/8/16/32 for the usual
        4-stage backbones; ResNets also have a stride-2 level first, which this skips).
        Extra keyword arguments go to ``timm.create_model``.
        """
        import ssm2d_vision  # noqa: F401  (registers this package's models with timm)
        import timm

        if drop_path_rate is not None:
            backbone_kwargs["drop_path_rate"] = drop_path_rate
        try:
            backbone = timm.create_model(name, pretrained=pretrained, features_only=True,
                                         out_indices=tuple(out_indices), **backbone_kwargs)
        except RuntimeError as exc:
            if "Unknown model" in str(exc):
                raise ValueError(f"name: timm has no model {name!r} (import ssm2d_vision first for "
                                 f"this package's models)") from exc
            raise
        in_channels = backbone.feature_info.channels()
        head = UperNetHead(in_channels, num_classes, channels=channels, dropout=dropout)
        aux_head = None
        if aux:
            if not -len(in_channels) <= aux_index < len(in_channels):
                raise ValueError(f"aux_index {aux_index} is out of range for {len(in_channels)} feature maps")
            aux_head = FCNHead(in_channels[aux_index], num_classes, channels=aux_channels, dropout=dropout)
        return cls(backbone, head, aux_head, aux_index=aux_index, aux_weight=aux_weight)

    def _upsample(self, logits: torch.Tensor, size) -> torch.Tensor:
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=self.align_corners)

    def forward(self, x: torch.Tensor):
        if x.dim() != 4:
            raise ValueError(f"x must be (B, C, H, W), got {tuple(x.shape)}")
        features = list(self.backbone(x))
        logits = self._upsample(self.head(features), x.shape[2:])
        if self.training and self.aux_head is not None:
            aux = self._upsample(self.aux_head(features[self.aux_index]), x.shape[2:])
            return logits, aux
        return logits

    def loss(self, outputs, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cross-entropy (pixels labelled ``ignore_index`` excluded from the mean) on the decode
        logits, plus ``aux_weight`` times the same on the auxiliary logits when given.

        Args:
            outputs: logits (B, K, H, W), or ``(logits, aux_logits)`` as ``forward`` returns in training.
            target: labels (B, H, W), int64, values in [0, K) or ``ignore_index``.

        Returns ``{"loss": total, "loss_decode": ..., "loss_aux": ...}`` (scalars; no aux entry
        without aux logits). The mean runs over non-ignored pixels (mmseg's ``avg_non_ignore=True``).
        """
        logits, aux = (outputs if isinstance(outputs, (tuple, list)) else (outputs, None))
        if target.dim() != 3 or target.shape[0] != logits.shape[0] or target.shape[1:] != logits.shape[2:]:
            raise ValueError(f"target must be (B, H, W) = {(logits.shape[0], *logits.shape[2:])}, "
                             f"got {tuple(target.shape)}")
        target = target.long()
        out = {"loss_decode": F.cross_entropy(logits, target, ignore_index=self.ignore_index)}
        total = out["loss_decode"]
        if aux is not None:
            out["loss_aux"] = F.cross_entropy(aux, target, ignore_index=self.ignore_index)
            total = total + self.aux_weight * out["loss_aux"]
        out["loss"] = total
        return out

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> class map (B, H, W), int64 (in eval mode, restoring the mode after)."""
        was_training = self.training
        self.eval()
        try:
            return self(x).argmax(dim=1)
        finally:
            self.train(was_training)
