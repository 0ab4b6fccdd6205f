"""Training-time augmentations of bags that keep their 2D structure.

* :func:`dihedral`: one of the 8 symmetries of the square (identity, 90/180/270-degree rotations, and
  each of these after a flip) applied to a slide's grid: cells that touch keep touching, a motif that
  lies above another lies beside or below it afterwards. The features do not move with respect to
  their cells; the level-0 coordinates are rewritten to the new layout (same origin and stride).
* :func:`crop`: a random axis-aligned window of the tissue grid keeping at least a given fraction of
  each side; patches outside are left out (the window always keeps at least one patch).
* :func:`feature_noise`: Gaussian noise added to every feature, its std a fraction of the slide's
  per-dimension feature std (so it means the same for any encoder's feature scale).

:class:`BagAugment` draws and applies them per bag from its own generator; the trainer seeds one per
(seed, epoch, step), so an interrupted run resumes with the same augmentations.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
import torch

from .bag import Bag, SlideGrid

__all__ = ["BagAugment", "crop", "dihedral", "feature_noise"]


def dihedral(slide: SlideGrid, k: int) -> SlideGrid:
    """The slide with its grid transformed by symmetry ``k`` (0-7): ``k % 4`` quarter turns
    (counter-clockwise, as ``np.rot90``) after a left-right flip when ``k >= 4``.

    Args:
        slide: rows, cols (N,) on a grid of shape (H, W).
        k: 0 is the identity.
    Returns:
        A SlideGrid with the same features (N, F) in the same order, new rows/cols, shape (H, W) or
        (W, H), and coords = origin + (col, row) * stride.
    """
    if not isinstance(k, (int, np.integer)) or not 0 <= int(k) < 8:
        raise ValueError(f"k: expected an integer symmetry index in 0..7, got {k!r}")
    k = int(k)
    h, w = slide.shape
    r, c = slide.rows.astype(np.int64), slide.cols.astype(np.int64)
    if k >= 4:
        c = w - 1 - c
    for _ in range(k % 4):  # one counter-clockwise quarter turn: (r, c) on (h, w) -> (w-1-c, r) on (w, h)
        r, c = w - 1 - c, r
        h, w = w, h
    origin = np.asarray(slide.coords).min(axis=0) if len(slide.coords) else np.zeros(2, np.int64)
    coords = np.stack([origin[0] + c * slide.stride, origin[1] + r * slide.stride], 1).astype(np.int64)
    return replace(slide, rows=r, cols=c, shape=(int(h), int(w)), coords=coords)


def crop(slide: SlideGrid, keep: float, rng: np.random.Generator) -> SlideGrid:
    """A random window of the slide's grid whose sides are at least ``keep`` (0 < keep <= 1) of the
    grid's, re-cropped to the patches inside it (at least one: the window is re-drawn around a
    random patch when it holds none).

    Returns:
        A SlideGrid of the N' <= N patches inside, features (N', F) in their original order.
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep: expected a fraction in (0, 1], got {keep!r}")
    h, w = slide.shape
    if keep >= 1.0:
        return slide
    hh = int(rng.integers(max(1, int(np.ceil(keep * h))), h + 1))
    ww = int(rng.integers(max(1, int(np.ceil(keep * w))), w + 1))
    r0, c0 = int(rng.integers(0, h - hh + 1)), int(rng.integers(0, w - ww + 1))
    inside = (slide.rows >= r0) & (slide.rows < r0 + hh) & (slide.cols >= c0) & (slide.cols < c0 + ww)
    if not inside.any():
        inside = np.zeros_like(inside)
        inside[int(rng.integers(0, len(inside)))] = True
    idx = np.nonzero(inside)[0]
    sel = torch.as_tensor(idx, dtype=torch.long, device=slide.features.device)
    return SlideGrid.from_coords(slide.slide_id, slide.features.index_select(0, sel), np.asarray(slide.coords)[idx],
                                 slide.stride, patch_size_level0=slide.patch_size_level0, meta=slide.meta)


def feature_noise(slide: SlideGrid, std: float, generator: torch.Generator) -> SlideGrid:
    """features + std * s * eps: s (F,) the slide's per-dimension feature std, eps ~ N(0, 1) drawn from
    ``generator`` (a CPU generator; the noise is moved to the features' device). Shapes unchanged."""
    if not std >= 0.0:
        raise ValueError(f"std: expected a number >= 0, got {std!r}")
    x = slide.features
    if std == 0.0 or x.shape[0] == 0:
        return slide
    scale = x.float().std(dim=0, unbiased=False) if x.shape[0] > 1 else x.float().abs()
    eps = torch.randn(x.shape, generator=generator, dtype=torch.float32)
    noisy = x + (std * eps.to(x.device) * scale).to(x.dtype)
    return replace(slide, features=noisy)


@dataclass
class BagAugment:
    """What to do to each training bag (per slide): ``dihedral`` (a random one of the 8 symmetries),
    ``crop`` (keep at least this fraction of each side; 1.0 = off), ``feature_noise`` (std as a
    fraction of the per-dimension feature std; 0 = off)."""

    dihedral: bool = False
    crop: float = 1.0
    feature_noise: float = 0.0

    @property
    def active(self) -> bool:
        return self.dihedral or self.crop < 1.0 or self.feature_noise > 0.0

    def __call__(self, bag: Bag, seed: int) -> Bag:
        """The augmented bag; the same ``seed`` gives the same result."""
        if not self.active:
            return bag
        rng = np.random.default_rng(seed)
        gen = torch.Generator().manual_seed(int(rng.integers(0, 2 ** 62)))
        slides = []
        for s in bag.slides:
            if self.crop < 1.0:
                s = crop(s, self.crop, rng)
            if self.dihedral:
                s = dihedral(s, int(rng.integers(0, 8)))
            if self.feature_noise > 0.0:
                s = feature_noise(s, self.feature_noise, gen)
            slides.append(s)
        return Bag(bag.bag_id, slides)

    @classmethod
    def from_train_config(cls, cfg) -> Optional["BagAugment"]:
        """From ``train.dihedral``, ``train.crop`` and ``train.feature_noise``; None when nothing is on."""
        aug = cls(dihedral=bool(cfg.dihedral), crop=float(cfg.crop), feature_noise=float(cfg.feature_noise))
        return aug if aug.active else None
