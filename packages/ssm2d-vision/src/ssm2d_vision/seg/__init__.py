"""Semantic segmentation in plain PyTorch: UperNet (+ FCN auxiliary head) on any timm
``features_only`` backbone.

    from ssm2d_vision.seg import SegModel
    model = SegModel.from_timm("vmamba_tiny", num_classes=150, drop_path_rate=0.2)
    logits, aux = model.train()(images)            # (B, 150, H, W) each
    loss = model.loss((logits, aux), labels)["loss"]
"""

from .heads import ConvBNReLU, FCNHead, PyramidPooling, UperNetHead, convert_mmseg_head_state_dict
from .metrics import confusion_matrix, mean_iou
from .model import SegModel
from .sample import kmeans_mask, load_sample_image

__all__ = [
    "ConvBNReLU", "PyramidPooling", "UperNetHead", "FCNHead", "SegModel", "convert_mmseg_head_state_dict",
    "confusion_matrix", "mean_iou", "load_sample_image", "kmeans_mask",
]
