"""Tissue detection on a low-resolution picture of a slide (numpy + scipy.ndimage only).

Stained tissue is coloured; glass is grey or white. The detector therefore thresholds the HSV
saturation of a picture read at about ``patch.tissue_mpp`` micrometres per pixel:

1. saturation ``S = (max - min) / max`` of the RGB channels (0..255); near-black pixels (pen marks,
   scanner borders, dust shadows, whose S is noise) are set to 0 first;
2. a median filter ``patch.median_um`` wide (evens out stain texture and salt noise);
3. tissue where S >= the threshold: ``patch.threshold`` when given, else Otsu's threshold on S, floored at
   ``patch.min_saturation`` (on an all-glass slide Otsu splits noise);
4. morphological closing (``patch.close_um`` disk radius: joins nearby tissue) then opening
   (``patch.open_um``: removes thin debris);
5. holes smaller than ``patch.min_hole_um2`` filled, fragments smaller than ``patch.min_fragment_um2``
   removed (areas in square micrometres, so the result does not depend on the picture's resolution).

Every length and area parameter is physical (um, um^2) and converted to pixels with the picture's mpp.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from scipy import ndimage as ndi

from .settings import PatchConfig

__all__ = ["detect_tissue", "disk", "fill_small_holes", "otsu_threshold", "remove_small_fragments", "saturation",
           "tissue_threshold"]

# 8-connectivity: diagonal neighbours belong to the same fragment (and the same hole).
_EIGHT = np.ones((3, 3), bool)


def saturation(rgb: np.ndarray, dark_value: float = 0.0) -> np.ndarray:
    """HSV saturation of an RGB uint8 picture (h, w, 3) as float32 (h, w) in 0..255; pixels whose
    value (max channel) is below ``dark_value`` get 0 (they are not stained tissue)."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb: expected an (h, w, 3) uint8 picture, got {rgb.dtype} of shape {rgb.shape}")
    hi = rgb.max(axis=2).astype(np.float32)
    lo = rgb.min(axis=2).astype(np.float32)
    s = np.where(hi > 0, (hi - lo) * 255.0 / np.maximum(hi, 1.0), 0.0).astype(np.float32)
    s[hi < dark_value] = 0.0
    return s


def otsu_threshold(values: np.ndarray, bins: int = 256, value_range: tuple[float, float] = (0.0, 256.0)) -> float:
    """Otsu's threshold: the cut ``t`` maximising the between-class variance of ``values < t`` and
    ``values >= t`` over a ``bins``-bin histogram of ``value_range`` (``t`` is a bin edge)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("values: Otsu's threshold needs at least one value")
    hist, edges = np.histogram(v, bins=bins, range=value_range)
    p = hist.astype(np.float64) / v.size
    centres = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(p)  # weight of the class at or below bin k
    m0 = np.cumsum(p * centres)
    mt = m0[-1]
    w1 = 1.0 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mt * w0 - m0) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1.0
    k = int(np.argmax(between))
    return float(edges[k + 1])


def tissue_threshold(sat: np.ndarray, cfg: PatchConfig) -> float:
    """The saturation cut of one picture: ``cfg.threshold``, else ``max(Otsu, cfg.min_saturation)``."""
    if cfg.threshold is not None:
        return float(cfg.threshold)
    return max(otsu_threshold(sat), float(cfg.min_saturation))


def disk(radius: float) -> np.ndarray:
    """A boolean disk structuring element of ``radius`` pixels ((2r+1, 2r+1); radius < 0.5 -> 1x1)."""
    r = int(np.floor(max(radius, 0.0) + 0.5))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return (yy * yy + xx * xx) <= radius * radius + 1e-9 if r > 0 else np.ones((1, 1), bool)


def _morph(op, mask: np.ndarray, radius_px: float) -> np.ndarray:
    """A binary morphology ``op`` (scipy's closing/opening) with a disk that does not eat tissue at the
    picture's edge: pad by the radius with the edge values first (scipy treats the outside as background)."""
    se = disk(radius_px)
    r = se.shape[0] // 2
    if r == 0:
        return mask
    padded = np.pad(mask, r, mode="edge")
    return op(padded, structure=se)[r:-r, r:-r]


def _closing(mask: np.ndarray, radius_px: float) -> np.ndarray:
    return _morph(ndi.binary_closing, mask, radius_px)


def _opening(mask: np.ndarray, radius_px: float) -> np.ndarray:
    return _morph(ndi.binary_opening, mask, radius_px)


def fill_small_holes(mask: np.ndarray, max_area_px: float) -> np.ndarray:
    """Fill holes (background regions not touching the picture's border) smaller than ``max_area_px``."""
    holes = ndi.binary_fill_holes(mask) & ~mask
    labels, n = ndi.label(holes, structure=np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool))
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    small = sizes < max_area_px
    small[0] = False
    return mask | small[labels]


def remove_small_fragments(mask: np.ndarray, min_area_px: float) -> np.ndarray:
    """Drop connected tissue components (8-connected) smaller than ``min_area_px``."""
    labels, n = ndi.label(mask, structure=_EIGHT)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_area_px
    keep[0] = False
    return keep[labels]


def detect_tissue(rgb: np.ndarray, mpp: float, cfg: Optional[PatchConfig] = None, *,
                  info: Optional[dict] = None) -> np.ndarray:
    """Boolean tissue mask of a low-resolution slide picture.

    Args:
        rgb: (h, w, 3) uint8 picture of the whole slide (glass white or grey).
        mpp: micrometres per pixel of ``rgb`` (not of level 0): turns the config's um / um^2 into pixels.
        cfg: the ``patch`` config section (defaults when None).
        info: when a dict is given, it receives ``threshold`` (the saturation cut used).
    Returns:
        (h, w) bool, True on tissue. Memory: a few float32 copies of the (h, w) picture.
    """
    cfg = cfg or PatchConfig()
    if not (mpp and mpp > 0):
        raise ValueError(f"mpp: expected the picture's positive micrometres per pixel, got {mpp!r}")
    sat = saturation(rgb, cfg.dark_value)
    size = int(round(cfg.median_um / mpp))
    if size >= 2:
        sat = ndi.median_filter(sat, size=size | 1, mode="nearest")
    t = tissue_threshold(sat, cfg)
    if info is not None:
        info["threshold"] = t
    mask = sat >= t
    mask = _closing(mask, cfg.close_um / mpp)
    mask = _opening(mask, cfg.open_um / mpp)
    px_area = mpp * mpp
    mask = fill_small_holes(mask, cfg.min_hole_um2 / px_area)
    return remove_small_fragments(mask, cfg.min_fragment_um2 / px_area)
