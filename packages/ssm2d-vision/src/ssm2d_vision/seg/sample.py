"""One small real photograph and a colour-cluster mask for it: a real-image smoke test of
segmentation training without any data set.

The mask is not a semantic annotation: it is k-means clustering of the pixels' CIE Lab colours
(deterministic initialisation at lightness quantiles, classes ordered dark to light), which gives
regions a segmentation model can learn from local colour and texture context.
"""

from __future__ import annotations

from importlib import resources

import torch

__all__ = ["load_sample_image", "kmeans_mask", "rgb_to_lab"]

SAMPLE_IMAGE = "grace_hopper_128x150.jpg"


def load_sample_image() -> torch.Tensor:
    """The shipped photograph (public domain, see ``seg/data/README.md``) as float32 RGB in [0, 1],
    shape (3, 150, 128)."""
    import numpy as np
    from PIL import Image

    with resources.files("ssm2d_vision.seg").joinpath("data", SAMPLE_IMAGE).open("rb") as fh:
        rgb = np.asarray(Image.open(fh).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] (3, H, W) -> CIE Lab (D65 white) (3, H, W): L in [0, 100], a/b about [-128, 127]."""
    if rgb.dim() != 3 or rgb.shape[0] != 3:
        raise ValueError(f"rgb must be (3, H, W), got {tuple(rgb.shape)}")
    rgb = rgb.double().clamp(0, 1)
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    m = torch.tensor([[0.4124564, 0.3575761, 0.1804375],
                      [0.2126729, 0.7151522, 0.0721750],
                      [0.0193339, 0.1191920, 0.9503041]], dtype=torch.float64)
    xyz = torch.einsum("ij,jhw->ihw", m, linear)
    xyz = xyz / torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64).view(3, 1, 1)
    eps = 216 / 24389
    f = torch.where(xyz > eps, xyz.clamp_min(1e-12) ** (1 / 3), (24389 / 27 * xyz + 16) / 116)
    lab = torch.stack([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])
    return lab.float()


def kmeans_mask(image: torch.Tensor, num_classes: int = 4, iters: int = 30) -> torch.Tensor:
    """Labels (H, W) int64 in [0, num_classes) from k-means on the Lab colours of ``image``
    (3, H, W) in [0, 1]. Centres start at the pixels of the lightness quantiles (i + 0.5) / k, so
    the result is deterministic; labels are then renumbered by increasing mean lightness.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    lab = rgb_to_lab(image)
    pts = lab.flatten(1).T.double()  # (H*W, 3)
    order = pts[:, 0].argsort()
    idx = ((torch.arange(num_classes, dtype=torch.float64) + 0.5) / num_classes * (len(pts) - 1)).long()
    centres = pts[order[idx]].clone()
    labels = torch.zeros(len(pts), dtype=torch.long)
    for _ in range(iters):
        labels = torch.cdist(pts, centres).argmin(dim=1)
        new = torch.stack([pts[labels == k].mean(0) if (labels == k).any() else centres[k]
                           for k in range(num_classes)])
        if torch.allclose(new, centres):
            break
        centres = new
    rank = torch.empty(num_classes, dtype=torch.long)
    rank[centres[:, 0].argsort()] = torch.arange(num_classes)
    return rank[labels].view(image.shape[1:])
