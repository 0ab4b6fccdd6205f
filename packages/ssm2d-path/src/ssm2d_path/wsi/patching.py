"""Patch grids of slides: tissue detection, a lattice at the requested resolution, TRIDENT patches files.

Per slide (:func:`plan_patches`):

* the target resolution is ``patch.target_mpp`` when set, else ``patch.target_magnification``; the
  level-0 patch side is ``round(patch_size * slide_magnification / target_magnification)`` (or
  ``round(patch_size * target_mpp / slide_mpp)``), so a 40x slide gets 512 level-0 px where a 20x
  slide gets 256 for the same 256 px at 20x; the level-0 stride is
  ``round((patch_size - overlap) * patch_size_level0 / patch_size)``; patches are read from the
  coarsest pyramid level that is not coarser than needed. A target finer than the scan (upsampling)
  is refused.
* tissue is detected on a picture read at about ``patch.tissue_mpp`` um/px (:mod:`.tissue`);
* the lattice starts at the tissue's bounding box; a cell is kept when at least ``patch.min_tissue``
  of its level-0 square is tissue (exact area of the mask inside the square, from a summed-area
  table) and the square lies inside the slide. Coordinates are in raster order.

:func:`patch_slides` does this for a batch, writes ``<job_dir>/<mag>x_<px>px_<ov>px_overlap/patches/
<slide>_patches.h5`` and ``.../visualization/<slide>.png``, skips slides already done (resume), and
reports unreadable slides without stopping.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np

from .coords import PatchGrid, grid_folder, patches_path, write_coords
from .settings import PatchConfig, SlidesConfig
from .slide import Slide, open_slide
from .tissue import detect_tissue

__all__ = ["PatchReport", "PlannedSlide", "draw_visualization", "find_slides", "grid_from_mask", "patch_slides",
           "plan_patches", "target_resolution", "tissue_fractions", "visualization_path"]

PathLike = Union[str, os.PathLike]
log = logging.getLogger(__name__)

# A target finer than level 0 by more than this factor would upsample the scan: refused.
UPSAMPLE_TOLERANCE = 1.1
CONTOUR_RGB = (0, 255, 0)
GRID_RGBA = (0, 0, 255, 200)


@dataclass
class PlannedSlide:
    """The grid of one slide and the tissue mask it was laid on.

    Attributes:
        grid: the patches (level-0 coordinates and geometry).
        tissue: (h, w) bool mask of the whole slide; level-0 (x, y) is mask pixel
            (x / tissue_downsample, y / tissue_downsample).
        tissue_downsample: level-0 pixels per mask pixel.
        threshold: the saturation cut the mask was made with.
    """

    grid: PatchGrid
    tissue: np.ndarray
    tissue_downsample: float
    threshold: float = float("nan")


@dataclass
class PatchReport:
    """What :func:`patch_slides` did: ``written`` / ``skipped`` (already there) patches files by slide
    path, ``failed`` reasons by slide path, and the number of patches by slide name (``empty``: slides
    without tissue, written as empty files)."""

    written: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    failed: dict = field(default_factory=dict)
    num_patches: dict = field(default_factory=dict)
    empty: list = field(default_factory=list)


def target_resolution(cfg: PatchConfig) -> tuple[float, float]:
    """(target_magnification, target_mpp) recorded for a config: ``target_mpp`` wins
    (magnification 10 / mpp), else ``target_magnification`` (mpp 10 / magnification)."""
    if cfg.target_mpp is not None:
        return 10.0 / float(cfg.target_mpp), float(cfg.target_mpp)
    if cfg.target_magnification is None:
        raise ValueError("patch.target_magnification: give target_magnification or target_mpp")
    return float(cfg.target_magnification), 10.0 / float(cfg.target_magnification)


def _level0_geometry(slide: Slide, cfg: PatchConfig) -> tuple[int, int]:
    """(patch_size_level0, stride_level0) of ``slide``; refuses a target finer than the scan."""
    ps = int(cfg.patch_size)
    if cfg.target_mpp is not None:
        scale = float(cfg.target_mpp) / slide.mpp
        asked, have = f"{cfg.target_mpp:g} um/px", f"{slide.mpp:.4g} um/px"
    else:
        scale = slide.magnification / float(cfg.target_magnification)
        asked, have = f"{cfg.target_magnification:g}x", f"{slide.magnification:g}x"
    if scale * UPSAMPLE_TOLERANCE < 1.0:
        raise ValueError(f"{slide.path}: the target resolution {asked} is finer than the slide's scan ({have} at "
                         "level 0); patches would be upsampled. Ask for a coarser target (patch.target_magnification "
                         "or patch.target_mpp).")
    psl0 = max(1, int(round(ps * scale)))
    stride = max(1, int(round((ps - int(cfg.overlap)) * psl0 / ps)))
    return psl0, stride


def _sat_at(sat: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The summed-area table ``sat`` ((h+1, w+1), sat[i, j] = mask[:i, :j].sum()) bilinearly
    interpolated at fractional mask coordinates ``x`` (columns) and ``y`` (rows), broadcast together.
    For a piecewise-constant mask this is exactly the mask's area in [0, x] x [0, y]."""
    h, w = sat.shape[0] - 1, sat.shape[1] - 1
    x = np.clip(x, 0.0, w)
    y = np.clip(y, 0.0, h)
    j = np.minimum(np.floor(x).astype(np.int64), max(w - 1, 0))
    i = np.minimum(np.floor(y).astype(np.int64), max(h - 1, 0))
    fx, fy = x - j, y - i
    s00, s01 = sat[i, j], sat[i, j + 1]
    s10, s11 = sat[i + 1, j], sat[i + 1, j + 1]
    return (s00 * (1 - fx) * (1 - fy) + s01 * fx * (1 - fy) + s10 * (1 - fx) * fy + s11 * fx * fy)


def tissue_fractions(tissue: np.ndarray, scale_xy: tuple[float, float], xs: np.ndarray, ys: np.ndarray,
                     size_level0: int) -> np.ndarray:
    """Fraction of each level-0 square [x, x + size) x [y, y + size) covered by the mask.

    Args:
        tissue: (h, w) bool mask of the slide; mask pixel (i, j) covers level-0
            [j / sx, (j + 1) / sx) x [i / sy, (i + 1) / sy).
        scale_xy: (sx, sy) mask pixels per level-0 pixel.
        xs: (nx,) level-0 left edges; ys: (ny,) level-0 top edges.
    Returns:
        (ny, nx) float64 in [0, 1]. Memory: the (h+1, w+1) summed-area table plus O(nx * ny).
    """
    sx, sy = scale_xy
    m = np.asarray(tissue, dtype=np.float64)
    sat = np.zeros((m.shape[0] + 1, m.shape[1] + 1), np.float64)
    sat[1:, 1:] = m.cumsum(0).cumsum(1)
    x0 = np.asarray(xs, np.float64)[None, :] * sx
    x1 = (np.asarray(xs, np.float64)[None, :] + size_level0) * sx
    y0 = np.asarray(ys, np.float64)[:, None] * sy
    y1 = (np.asarray(ys, np.float64)[:, None] + size_level0) * sy
    area = _sat_at(sat, x1, y1) - _sat_at(sat, x0, y1) - _sat_at(sat, x1, y0) + _sat_at(sat, x0, y0)
    return np.clip(area / ((size_level0 * sx) * (size_level0 * sy)), 0.0, 1.0)


def grid_from_mask(tissue: np.ndarray, slide_size: tuple[int, int], size_level0: int, stride_level0: int,
                   min_tissue: float) -> np.ndarray:
    """Level-0 top-left (x, y) of the kept cells of a lattice laid on a tissue mask.

    The lattice starts at the level-0 top-left of the mask's tissue bounding box, steps
    ``stride_level0``, covers the box, and keeps the squares of ``size_level0`` that lie inside the
    slide (``slide_size`` = (W0, H0)) with a tissue fraction >= ``min_tissue``.

    Returns:
        (N, 2) int64 in raster order (by y, then x); (0, 2) without tissue.
    """
    W0, H0 = int(slide_size[0]), int(slide_size[1])
    tissue = np.asarray(tissue, bool)
    h, w = tissue.shape
    rows, cols = np.nonzero(tissue.any(axis=1))[0], np.nonzero(tissue.any(axis=0))[0]
    if rows.size == 0 or size_level0 > W0 or size_level0 > H0:
        return np.zeros((0, 2), np.int64)
    sx, sy = w / W0, h / H0
    bx0, bx1 = int(np.floor(cols[0] / sx)), int(np.ceil((cols[-1] + 1) / sx))
    by0, by1 = int(np.floor(rows[0] / sy)), int(np.ceil((rows[-1] + 1) / sy))
    # Cells start inside the box and end inside the slide.
    xs = np.arange(bx0, min(bx1, W0 - size_level0 + 1), stride_level0, dtype=np.int64)
    ys = np.arange(by0, min(by1, H0 - size_level0 + 1), stride_level0, dtype=np.int64)
    if xs.size == 0 or ys.size == 0:
        return np.zeros((0, 2), np.int64)
    frac = tissue_fractions(tissue, (sx, sy), xs, ys, size_level0)
    # The tolerance keeps a cell whose area equals the threshold exactly despite float rounding.
    iy, ix = np.nonzero(frac >= min_tissue - 1e-9)
    return np.stack([xs[ix], ys[iy]], axis=1).astype(np.int64)


def _tissue_picture(slide: Slide, cfg: PatchConfig) -> tuple[np.ndarray, float]:
    """The slide read at about ``cfg.tissue_mpp`` um/px (never finer than level 0) and its downsample."""
    downsample = max(1.0, float(cfg.tissue_mpp) / slide.mpp)
    return slide.thumbnail(downsample=downsample)


def _tissue_attrs(cfg: PatchConfig, threshold: float, slide: Slide) -> dict:
    from ..__about__ import __version__

    keys = ("min_tissue", "tissue_mpp", "min_saturation", "dark_value", "median_um", "close_um", "open_um",
            "min_fragment_um2", "min_hole_um2")
    attrs = {k if "tissue" in k else f"tissue_{k}": float(getattr(cfg, k)) for k in keys}
    attrs.update({"tissue_threshold": float(threshold),
                  "tissue_threshold_method": "fixed" if cfg.threshold is not None else "otsu",
                  "mpp_source": slide.mpp_source, "ssm2d_path_version": __version__,
                  "coordinates": "level-0 top-left (x, y)"})
    return attrs


def plan_patches(slide: Slide, cfg: Optional[PatchConfig] = None) -> PlannedSlide:
    """Detect tissue on ``slide`` and lay its patch grid (see the module docstring).

    Raises:
        MissingMPPError when the slide has no mpp (open it with ``mpp=``); ValueError naming the slide
        when the target is finer than its scan; SlideReadError when its pixels cannot be read.
    """
    cfg = cfg or PatchConfig()
    cfg.check()
    mpp = slide.mpp  # MissingMPPError first: every later number depends on it
    psl0, stride = _level0_geometry(slide, cfg)
    tmag, tmpp = target_resolution(cfg)
    rgb, ds = _tissue_picture(slide, cfg)
    info: dict = {}
    tissue = detect_tissue(rgb, mpp * ds, cfg, info=info)
    coords = grid_from_mask(tissue, slide.dimensions, psl0, stride, cfg.min_tissue)
    W0, H0 = slide.dimensions
    grid = PatchGrid(name=slide.name, coords=coords, patch_size=int(cfg.patch_size), patch_size_level0=psl0,
                     stride_level0=stride, overlap=int(cfg.overlap), level0_magnification=slide.magnification,
                     target_magnification=tmag, mpp=mpp, target_mpp=tmpp, level0_width=W0, level0_height=H0,
                     read_level=slide.best_level_for_downsample(psl0 / cfg.patch_size),
                     slide_path=str(slide.path.resolve()), attrs=_tissue_attrs(cfg, info["threshold"], slide))
    return PlannedSlide(grid=grid, tissue=tissue, tissue_downsample=ds, threshold=info["threshold"])


# -- the picture ---------------------------------------------------------------------------------


def _mask_on(tissue: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``tissue`` resampled onto a picture of ``shape`` covering the same slide; enlarging goes through
    a bilinear blend cut at 1/2, so the drawn contour is smooth instead of a staircase of mask pixels."""
    from PIL import Image

    h, w = shape
    img = Image.fromarray(np.asarray(tissue, bool).astype(np.uint8) * 255)
    resample = Image.Resampling.BILINEAR if h >= tissue.shape[0] else Image.Resampling.NEAREST
    return np.asarray(img.resize((w, h), resample)) >= 128


def _contour(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels of ``mask`` within ``width`` px of its boundary (the picture's edge is not a boundary)."""
    from scipy import ndimage as ndi

    inner = ndi.binary_erosion(mask, structure=np.ones((3, 3), bool), iterations=max(1, width), border_value=1)
    return mask & ~inner


def draw_visualization(thumb: np.ndarray, downsample: float, tissue: np.ndarray, grid: PatchGrid,
                       path: PathLike) -> Path:
    """Write a PNG of the slide with the tissue contour (green) and the patch squares (blue) on it.

    Args:
        thumb: (h, w, 3) uint8 picture of the whole slide; level-0 (x, y) is pixel (x, y) / downsample.
        downsample: level-0 pixels per ``thumb`` pixel.
        tissue: bool mask of the whole slide at any resolution (resampled onto ``thumb``).
        grid: the patches to outline.
        path: the PNG (written atomically).
    """
    from PIL import Image, ImageDraw

    from ssm2d_nn.fileio import atomic_output

    thumb = np.ascontiguousarray(thumb, dtype=np.uint8)
    h, w = thumb.shape[:2]
    base = Image.fromarray(thumb).convert("RGBA")
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    side = grid.patch_size_level0 / downsample
    line = 1 if side < 24 else 2
    for x, y in grid.coords:
        x0, y0 = x / downsample, y / downsample
        box = [x0, y0, x0 + side - 1, y0 + side - 1]
        if side >= 3:
            draw.rectangle(box, outline=GRID_RGBA, width=line)
        else:  # squares too small to outline: shade them
            draw.rectangle(box, fill=(0, 0, 255, 90))
    out = np.asarray(Image.alpha_composite(base, layer).convert("RGB")).copy()
    width = max(2, int(round(max(h, w) / 700)))
    out[_contour(_mask_on(tissue, (h, w)), width)] = CONTOUR_RGB
    path = Path(path)
    with atomic_output(path) as tmp:
        Image.fromarray(out).save(tmp, format="PNG")
    return path


def visualization_path(job_dir: PathLike, grid: PatchGrid) -> Path:
    """``<job_dir>/<mag>x_<px>px_<ov>px_overlap/visualization/<slide>.png``."""
    return Path(job_dir) / grid.folder() / "visualization" / f"{grid.name}.png"


# -- batches -------------------------------------------------------------------------------------


def find_slides(slides_cfg: SlidesConfig) -> list[Path]:
    """Slide files of ``slides.dir``: the file itself, or the folder's files with one of
    ``slides.extensions`` (case-insensitive; subfolders too when ``slides.recursive``), sorted.

    Raises:
        ValueError when ``slides.dir`` is not set; FileNotFoundError naming it when it does not exist.
    """
    if not slides_cfg.dir:
        raise ValueError("slides.dir: give a slide file or a folder of slides (or --slides)")
    root = Path(slides_cfg.dir)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"slides.dir: {root} does not exist")
    exts = {e.lower().lstrip(".") for e in slides_cfg.extensions}
    files = root.rglob("*") if slides_cfg.recursive else root.iterdir()
    return sorted(p for p in files if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower().lstrip(".") in exts)


def _count_patches(path: Path) -> Optional[int]:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return int(f["coords"].shape[0])
    except (OSError, KeyError, ValueError):
        return None


def _patch_one(path: Path, job_dir: Path, cfg: PatchConfig, mpp: Optional[float]) -> PatchGrid:
    with open_slide(path, mpp=mpp) as slide:
        plan = plan_patches(slide, cfg)
        grid = plan.grid
        write_coords(patches_path(job_dir, grid), grid)
        thumb, ds = slide.thumbnail(max_side=cfg.thumbnail_max_side)
        draw_visualization(thumb, ds, plan.tissue, grid, visualization_path(job_dir, grid))
    return grid


def patch_slides(paths: Iterable[PathLike], job_dir: PathLike, cfg: Optional[PatchConfig] = None, *,
                 mpp: Optional[float] = None, overwrite: bool = False, progress: bool = True) -> PatchReport:
    """Patch every slide of ``paths`` into ``job_dir`` (TRIDENT's layout).

    A slide whose patches file exists is skipped unless ``overwrite``. A slide that fails (unreadable,
    no mpp and ``mpp`` not given, target finer than its scan, ...) is logged and recorded in
    ``report.failed`` with the reason; the others go on. A slide without tissue gets an empty (0, 2)
    patches file. ``mpp`` is the level-0 um/px for slides whose file records none.
    """
    from .._progress import progress_bar

    cfg = cfg or PatchConfig()
    cfg.check()
    job_dir = Path(job_dir)
    folder = grid_folder(target_resolution(cfg)[0], cfg.patch_size, cfg.overlap)
    report = PatchReport()
    seen: dict[str, Path] = {}
    paths = [Path(p) for p in paths]
    bar = progress_bar(paths, desc="patch", unit="slide", enabled=progress)
    for path in bar:
        bar.set_postfix_str(path.name, refresh=False)
        name = path.stem
        if name in seen:
            reason = f"same slide name {name!r} as {seen[name]} (the outputs are named by file stem)"
            report.failed[path] = reason
            log.warning("patch: %s: %s", path, reason)
            continue
        seen[name] = path
        out = patches_path(job_dir, folder, name)
        if out.is_file() and not overwrite:
            report.skipped[path] = out
            n = _count_patches(out)
            if n is not None:
                report.num_patches[name] = n
            continue
        try:
            grid = _patch_one(path, job_dir, cfg, mpp)
        except Exception as e:  # one slide's failure must not stop the batch; the reason is reported
            reason = str(e) if str(path) in str(e) else f"{path}: {type(e).__name__}: {e}"
            report.failed[path] = reason
            log.warning("patch: %s", reason)
            continue
        report.written[path] = out
        report.num_patches[name] = grid.num_patches
        if grid.num_patches == 0:
            report.empty.append(name)
            log.warning("patch: %s: no tissue found; wrote an empty patches file %s", path, out)
    return report
