"""Readers for the patch-feature files pathology users already have: CLAM, TRIDENT and STAMP.

Every reader returns a :class:`~ssm2d_path.bag.SlideGrid` with float32 features (N, F), integer
level-0 coordinates (N, 2) and the slide's own lattice stride. The stride comes from the file's
attributes when they define it, else from the ``stride=`` argument, else it is inferred from the
coordinates; ``meta["stride_source"]`` says which ("attribute", "argument", "inferred").

Geometry attributes per format (see the project's PATHOLOGY.md):

* TRIDENT: on ``coords``: ``patch_size_level0``, ``overlap`` (at the target magnification),
  ``patch_size``; lattice stride ``patch_size_level0 - round(overlap * patch_size_level0 / patch_size)``
  (TRIDENT steps by ``patch_size_src - overlap_src``, both rounded level-0 sizes).
* CLAM: on the patches file's ``coords``: ``patch_size`` (at ``patch_level``) and ``downsample``, the
  *patch level's* downsample ``(dx, dy)``; older/forked files hold a scalar, or the list of every
  level's downsample, which is then indexed by ``patch_level``. Stride ``patch_size * dx``. CLAM does
  not record its ``step_size``: when the coordinates are spaced more tightly than that (overlapping
  patches) or are off its lattice, the coordinate spacing is used and the disagreement logged.
* STAMP: ``coords`` in micrometres and file attributes ``unit="um"``, ``tile_size_um``,
  ``tile_size_px``; grid indices are ``(coords_um - min) / tile_size_um``. ``SlideGrid.coords`` are
  level-0 pixels when the level-0 ``mpp`` is given (``round(um / mpp)``); STAMP files do not record it,
  so otherwise they are pixels at the tile resolution (``round(um * tile_size_px / tile_size_um)``,
  ``meta["coords_unit"] == "tile_px"``, stride ``tile_size_px``). The micrometre coordinates are kept in
  ``meta["coords_um"]``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Union

import h5py
import numpy as np
import torch

from ..bag import SlideGrid, grid_indices
from .errors import EmptySlideError, SlideFileError
from .stride import fits_lattice, infer_spacing

__all__ = ["FORMATS", "detect_format", "read_slide", "is_patches_file", "slide_id_of"]

logger = logging.getLogger(__name__)

FORMATS = ("clam", "trident", "stamp")
H5_SUFFIXES = (".h5", ".hdf5")
PT_SUFFIXES = (".pt", ".pth")

PathLike = Union[str, Path]


def slide_id_of(path: PathLike) -> str:
    """A slide's id is its file's stem (``TCGA-XX-1234.h5`` -> ``TCGA-XX-1234``)."""
    return Path(path).stem


def _attrs(obj) -> dict[str, Any]:
    out = {}
    for k, v in obj.attrs.items():
        if isinstance(v, bytes):
            v = v.decode("utf-8", "replace")
        elif isinstance(v, np.generic):
            v = v.item()
        out[k] = v
    return out


def _open_h5(path: Path) -> h5py.File:
    if not path.is_file():
        raise SlideFileError(f"{path}: no such file")
    try:
        return h5py.File(path, "r")
    except (OSError, ValueError) as e:
        raise SlideFileError(f"{path}: cannot be opened as HDF5 (truncated or not an HDF5 file): {e}") from e


def is_patches_file(path: PathLike) -> bool:
    """True for a CLAM patches file: an HDF5 file with ``coords`` but no features."""
    path = Path(path)
    if path.suffix.lower() not in H5_SUFFIXES:
        return False
    try:
        with h5py.File(path, "r") as f:
            return "coords" in f and "features" not in f and "feats" not in f
    except (OSError, ValueError):
        return False


def detect_format(path: PathLike) -> str:
    """``"clam"``, ``"trident"`` or ``"stamp"`` for a feature file.

    ``.pt``/``.pth`` are CLAM; an HDF5 file with ``feats`` is STAMP; one with ``features`` is TRIDENT
    when it carries TRIDENT's geometry (``patch_size_level0`` on ``coords`` or ``encoder`` on
    ``features``), else CLAM.

    Raises:
        SlideFileError naming the file when it is unreadable or holds no features.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in PT_SUFFIXES:
        return "clam"
    if suffix not in H5_SUFFIXES:
        raise SlideFileError(f"{path}: unknown feature file type {suffix!r} (expected .h5, .hdf5, .pt or .pth)")
    with _open_h5(path) as f:
        try:
            keys = set(f.keys())
            if "feats" in keys:
                return "stamp"
            if "features" in keys:
                if ("coords" in keys and "patch_size_level0" in f["coords"].attrs) or "encoder" in f["features"].attrs:
                    return "trident"
                return "clam"
        except (OSError, KeyError) as e:
            raise SlideFileError(f"{path}: HDF5 structure cannot be read: {e}") from e
    if "coords" in keys:
        raise SlideFileError(f"{path}: a patches file (coords only, no 'features' or 'feats' dataset), not a feature file")
    raise SlideFileError(f"{path}: no 'features' (CLAM/TRIDENT) or 'feats' (STAMP) dataset; found {sorted(keys)}")


# --------------------------------------------------------------------------------------------------
# Validation shared by all formats


def _check_features(path: Path, feats: np.ndarray) -> torch.Tensor:
    if feats.ndim != 2:
        raise SlideFileError(f"{path}: features must be 2-D (N, F), got shape {feats.shape}")
    t = torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))
    if t.shape[0] and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).any(dim=1).sum())
        raise SlideFileError(f"{path}: {bad} of {t.shape[0]} feature rows contain NaN or inf")
    return t


def _check_coords(path: Path, coords: np.ndarray, n: int, what: str = "coords") -> np.ndarray:
    coords = np.asarray(coords)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise SlideFileError(f"{path}: {what} must have shape (N, 2), got {coords.shape}")
    if coords.shape[0] != n:
        raise SlideFileError(f"{path}: {n} feature rows but {coords.shape[0]} {what} rows")
    if not np.issubdtype(coords.dtype, np.number) or not np.all(np.isfinite(coords)):
        raise SlideFileError(f"{path}: {what} must be finite numbers")
    if n:
        uniq = np.unique(coords, axis=0).shape[0]
        if uniq != n:
            raise SlideFileError(f"{path}: {n - uniq} duplicate {what} (two patches at the same position)")
    return coords


def _resolve_stride(path: Path, coords: np.ndarray, attr: Optional[float], arg: Optional[float], meta: dict) -> float:
    """Lattice stride in coordinate units; records ``stride_source`` (and a note) in ``meta``."""
    if attr is not None:
        spacing = infer_spacing(coords)
        # 2 % slack: float (micrometre) coordinates and anisotropic CLAM downsamples are not exact.
        if spacing is not None and abs(spacing - attr) > 0.02 * attr:
            if spacing < attr or not fits_lattice(coords, attr):
                note = (f"attribute stride {attr:g} disagrees with the coordinate spacing {spacing:g}; "
                        f"using the coordinate spacing (overlapping patches or a different patching step)")
                logger.warning("%s: %s", path, note)
                meta["stride_source"], meta["stride_note"] = "inferred", note
                meta["attribute_stride"] = attr
                return spacing
        meta["stride_source"] = "attribute"
        return attr
    if arg is not None:
        if arg <= 0:
            raise ValueError(f"stride: must be positive, got {arg}")
        if not fits_lattice(coords, arg):
            raise SlideFileError(f"{path}: coordinates are not on a lattice of the given stride={arg:g} "
                                 f"(one patch per cell); their spacing looks like {infer_spacing(coords)}")
        meta["stride_source"] = "argument"
        return float(arg)
    spacing = infer_spacing(coords)
    if spacing is None:
        if len(coords) == 1:
            # A single patch makes a 1 x 1 grid whatever the stride; nothing to infer it from.
            meta["stride_source"], meta["stride_note"] = "inferred", "single patch: stride unknown, set to 1"
            return 1.0
        raise SlideFileError(f"{path}: cannot infer the stride from the coordinates; pass stride=")
    meta["stride_source"] = "inferred"
    return spacing


def _grid(path: Path, slide_id: str, feats: torch.Tensor, lattice_coords: np.ndarray, lattice_stride: float,
          coords_px: np.ndarray, stride_px: int, patch_size_level0: Optional[int], meta: dict) -> SlideGrid:
    try:
        rows, cols, shape = grid_indices(lattice_coords, lattice_stride, name=f"{path}: coords")
    except ValueError as e:
        raise SlideFileError(str(e)) from e
    if stride_px < 1:
        raise SlideFileError(f"{path}: stride {stride_px} px is not positive")
    return SlideGrid(slide_id, feats, np.asarray(coords_px).astype(np.int64), int(stride_px), rows, cols, shape,
                     patch_size_level0=None if patch_size_level0 is None else int(patch_size_level0), meta=meta)


def _empty(path: Path, n_feat: int) -> EmptySlideError:
    return EmptySlideError(f"{path}: empty slide (0 patches, feature dim {n_feat})")


# --------------------------------------------------------------------------------------------------
# TRIDENT


def trident_lattice_stride(attrs: dict) -> Optional[tuple[int, int]]:
    """(lattice stride, patch_size_level0) from TRIDENT ``coords`` attributes, or None if absent."""
    if "patch_size_level0" not in attrs:
        return None
    psl0 = int(round(float(attrs["patch_size_level0"])))
    overlap = float(attrs.get("overlap", 0) or 0)
    ps = float(attrs.get("patch_size", 0) or 0)
    # ``overlap`` is given at the target magnification; TRIDENT rounds its level-0 size separately.
    ov_l0 = int(round(overlap * psl0 / ps)) if ps > 0 else int(round(overlap))
    return psl0 - ov_l0, psl0


def _read_trident(path: Path, stride, slide_id: str) -> SlideGrid:
    with _open_h5(path) as f:
        try:
            for key in ("features", "coords"):
                if key not in f:
                    raise SlideFileError(f"{path}: TRIDENT file without a '{key}' dataset (found {sorted(f.keys())})")
            feats = f["features"][()]
            coords = f["coords"][()]
            cattrs, fattrs, rattrs = _attrs(f["coords"]), _attrs(f["features"]), _attrs(f)
        except OSError as e:
            raise SlideFileError(f"{path}: truncated or corrupt HDF5 data: {e}") from e
    t = _check_features(path, feats)
    coords = _check_coords(path, coords, t.shape[0])
    meta: dict[str, Any] = {"format": "trident", "path": str(path), "encoder": fattrs.get("encoder"),
                            "magnification": cattrs.get("target_magnification"),
                            "level0_magnification": cattrs.get("level0_magnification"),
                            "patch_size": cattrs.get("patch_size"), "overlap": cattrs.get("overlap", 0),
                            "level0_width": cattrs.get("level0_width"), "level0_height": cattrs.get("level0_height"),
                            "mpp": rattrs.get("level0_mpp", cattrs.get("level0_mpp")), "attrs": cattrs}
    if t.shape[0] == 0:
        raise _empty(path, t.shape[1])
    geo = trident_lattice_stride(cattrs)
    attr_stride, psl0 = (float(geo[0]), geo[1]) if geo else (None, None)
    if attr_stride is not None and attr_stride <= 0:
        raise SlideFileError(f"{path}: overlap {cattrs.get('overlap')} leaves no positive stride "
                             f"(patch_size_level0 {psl0})")
    s = _resolve_stride(path, coords, attr_stride, stride, meta)
    return _grid(path, slide_id, t, coords, s, coords, int(round(s)), psl0, meta)


# --------------------------------------------------------------------------------------------------
# CLAM


def clam_downsample(attrs: dict) -> Optional[tuple[float, float]]:
    """The patch level's downsample (dx, dy) from CLAM ``coords`` attributes (both conventions)."""
    level = int(attrs.get("patch_level", 0) or 0)
    if "downsample" not in attrs:
        return (1.0, 1.0) if level == 0 else None
    ds = np.asarray(attrs["downsample"], dtype=np.float64)
    if ds.ndim == 0:
        return float(ds), float(ds)
    if ds.ndim == 2 and ds.shape[1] == 2 and level < ds.shape[0]:
        return float(ds[level, 0]), float(ds[level, 1])
    flat = ds.ravel()
    if flat.size == 2 and abs(flat[0] - flat[1]) <= 0.1 * max(flat.max(), 1e-9):
        return float(flat[0]), float(flat[1])  # CLAM: the level's own (dx, dy)
    if level < flat.size:
        return float(flat[level]), float(flat[level])  # a per-level list of scalars
    return None


def clam_patch_size_level0(attrs: dict) -> Optional[int]:
    """``patch_size * downsample_x`` of the patch level, from CLAM ``coords`` attributes."""
    if "patch_size" not in attrs:
        return None
    ds = clam_downsample(attrs)
    if ds is None:
        return None
    ps = float(attrs["patch_size"])
    sx, sy = int(round(ps * ds[0])), int(round(ps * ds[1]))
    if sx != sy:
        logger.warning("CLAM %s: anisotropic level-0 patch size %dx%d; the grid uses %d", attrs.get("name", ""), sx, sy, sx)
    return sx


def _load_pt(path: Path) -> np.ndarray:
    if not path.is_file():
        raise SlideFileError(f"{path}: no such file")
    from ssm2d_nn.fileio import load_weights

    try:
        obj = load_weights(path, what="feature file")
    except (OSError, ValueError) as e:  # says what is wrong with the file; never suggests an unsafe load
        raise SlideFileError(str(e)) from None
    if isinstance(obj, dict) and "features" in obj:
        obj = obj["features"]
    if not isinstance(obj, torch.Tensor):
        raise SlideFileError(f"{path}: expected a (N, F) tensor of features, got {type(obj).__name__}")
    return obj.detach().to(torch.float32).numpy()


def _read_patches(patches_path: Path) -> tuple[np.ndarray, dict]:
    with _open_h5(patches_path) as f:
        if "coords" not in f:
            raise SlideFileError(f"{patches_path}: CLAM patches file without a 'coords' dataset")
        try:
            return f["coords"][()], _attrs(f["coords"])
        except OSError as e:
            raise SlideFileError(f"{patches_path}: truncated or corrupt HDF5 data: {e}") from e


def _read_clam(path: Path, patches_path: Optional[Path], stride, slide_id: str) -> SlideGrid:
    pcoords, pattrs = (None, {})
    if patches_path is not None:
        pcoords, pattrs = _read_patches(patches_path)
    if path.suffix.lower() in PT_SUFFIXES:
        if patches_path is None:
            raise SlideFileError(f"{path}: a CLAM .pt file holds features only; the coordinates come from the "
                                 f"CLAM patches file (patches/<slide>.h5): pass patches_path= / --patches-dir")
        feats, coords, cattrs = _load_pt(path), pcoords, {}
        where = f"{patches_path} coords"
    else:
        with _open_h5(path) as f:
            try:
                if "features" not in f:
                    raise SlideFileError(f"{path}: CLAM file without a 'features' dataset (found {sorted(f.keys())})")
                feats = f["features"][()]
                coords = f["coords"][()] if "coords" in f else None
                cattrs = _attrs(f["coords"]) if "coords" in f else {}
            except OSError as e:
                raise SlideFileError(f"{path}: truncated or corrupt HDF5 data: {e}") from e
        where = "coords"
        if coords is None:
            if pcoords is None:
                raise SlideFileError(f"{path}: no 'coords' dataset and no CLAM patches file to take them from")
            coords, where = pcoords, f"{patches_path} coords"
        elif pcoords is not None and len(pcoords) != len(coords):
            raise SlideFileError(f"{path}: {len(coords)} coords but the patches file {patches_path} has {len(pcoords)}")
    t = _check_features(path, feats)
    coords = _check_coords(path, coords, t.shape[0], what=where)
    geo_attrs = pattrs if "patch_size" in pattrs else cattrs
    ds = clam_downsample(geo_attrs) if "patch_size" in geo_attrs else None
    meta: dict[str, Any] = {"format": "clam", "path": str(path), "encoder": None, "magnification": None,
                            "level0_magnification": None, "mpp": None,
                            "patches_path": None if patches_path is None else str(patches_path),
                            "patch_size": geo_attrs.get("patch_size"), "patch_level": geo_attrs.get("patch_level"),
                            "downsample": ds, "attrs": geo_attrs}
    if t.shape[0] == 0:
        raise _empty(path, t.shape[1])
    psl0 = clam_patch_size_level0(geo_attrs)
    s = _resolve_stride(path, coords, None if psl0 is None else float(psl0), stride, meta)
    return _grid(path, slide_id, t, coords, s, coords, int(round(s)), psl0, meta)


# --------------------------------------------------------------------------------------------------
# STAMP


def _read_stamp(path: Path, stride, slide_id: str, mpp: Optional[float]) -> SlideGrid:
    with _open_h5(path) as f:
        try:
            for key in ("feats", "coords"):
                if key not in f:
                    raise SlideFileError(f"{path}: STAMP file without a '{key}' dataset (found {sorted(f.keys())})")
            feats, coords, rattrs = f["feats"][()], f["coords"][()], _attrs(f)
        except OSError as e:
            raise SlideFileError(f"{path}: truncated or corrupt HDF5 data: {e}") from e
    t = _check_features(path, feats)
    coords = _check_coords(path, np.asarray(coords, dtype=np.float64), t.shape[0])
    unit = rattrs.get("unit")
    tile_um = float(rattrs["tile_size_um"]) if "tile_size_um" in rattrs else None
    tile_px = float(rattrs["tile_size_px"]) if "tile_size_px" in rattrs else None
    meta: dict[str, Any] = {"format": "stamp", "path": str(path), "encoder": rattrs.get("extractor"),
                            "unit": unit, "tile_size_um": tile_um, "tile_size_px": tile_px,
                            "mpp": mpp, "magnification": None, "level0_magnification": None, "attrs": rattrs}
    if tile_um and tile_px:
        meta["target_mpp"] = tile_um / tile_px
        meta["magnification"] = 10.0 / meta["target_mpp"]  # the usual convention 20x ~ 0.5 um/px
    if mpp:
        meta["level0_magnification"] = 10.0 / mpp
    if t.shape[0] == 0:
        raise _empty(path, t.shape[1])
    if unit not in (None, "um"):
        raise SlideFileError(f"{path}: STAMP coords unit {unit!r} is not supported (expected 'um')")
    if unit is None:
        # Older STAMP files carry neither the unit nor the tile size: the coordinates are taken as pixels.
        meta["coords_unit"] = "px"
        s = _resolve_stride(path, coords, None, stride, meta)
        return _grid(path, slide_id, t, coords, s, np.rint(coords), int(round(s)), None, meta)
    meta["coords_um"] = coords
    s_um = _resolve_stride(path, coords, tile_um, stride, meta)
    if mpp:
        if mpp <= 0:
            raise ValueError(f"mpp: must be positive, got {mpp}")
        scale, meta["coords_unit"] = 1.0 / mpp, "level0_px"
    elif tile_um and tile_px:
        scale, meta["coords_unit"] = tile_px / tile_um, "tile_px"
    else:
        scale, meta["coords_unit"] = 1.0, "um"
    stride_px = int(round(s_um * scale))
    psl0 = int(round(tile_um * scale)) if tile_um else None
    return _grid(path, slide_id, t, coords, s_um, np.rint(coords * scale), stride_px, psl0, meta)


# --------------------------------------------------------------------------------------------------


def read_slide(path: PathLike, *, fmt: str = "auto", patches_path: Optional[PathLike] = None,
               stride: Optional[float] = None, slide_id: Optional[str] = None,
               mpp: Optional[float] = None) -> SlideGrid:
    """Read one slide's features and coordinates into a :class:`SlideGrid`.

    Args:
        path: the feature file (CLAM ``h5_files/<slide>.h5`` or ``pt_files/<slide>.pt``, TRIDENT or STAMP h5).
        fmt: ``"auto"`` (see :func:`detect_format`), ``"clam"``, ``"trident"`` or ``"stamp"``.
        patches_path: CLAM patches file ``patches/<slide>.h5`` (geometry attributes; required for ``.pt``).
        stride: lattice stride in coordinate units (level-0 px; micrometres for STAMP) used when the
            file's attributes do not define one; else it is inferred from the coordinates.
        slide_id: defaults to the file's stem.
        mpp: level-0 micrometres per pixel (STAMP only: turns micrometre coordinates into level-0 px).
    Returns:
        SlideGrid with features (N, F) float32, coords (N, 2) int64, the grid and ``meta`` (format,
        encoder, stride_source, magnification/mpp when known, path). Memory: N * F * 4 bytes.
    Raises:
        EmptySlideError when the file holds 0 patches; SlideFileError naming the file for anything
        unreadable, missing, mismatched, non-finite or duplicated.
    """
    path = Path(path)
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"fmt: expected 'auto' or one of {FORMATS}, got {fmt!r}")
    slide_id = slide_id or slide_id_of(path)
    if fmt == "trident":
        return _read_trident(path, stride, slide_id)
    if fmt == "clam":
        return _read_clam(path, None if patches_path is None else Path(patches_path), stride, slide_id)
    return _read_stamp(path, stride, slide_id, mpp)
