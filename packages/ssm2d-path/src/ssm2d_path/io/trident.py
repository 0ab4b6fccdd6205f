"""Writing TRIDENT feature files, and converting CLAM / STAMP files to TRIDENT's layout."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import h5py
import numpy as np
import torch

from ..__about__ import __version__
from .errors import SlideFileError
from .readers import PathLike, read_slide
from ssm2d_nn.fileio import atomic_output

__all__ = ["write_trident", "trident_folder", "convert_slide"]

logger = logging.getLogger(__name__)


def _attr_value(v: Any) -> Any:
    """HDF5 attributes take numbers, strings and arrays; anything else is stored as its repr."""
    if v is None:
        return "None"
    if isinstance(v, (str, bytes, int, float, bool, np.generic)):
        return v
    try:
        arr = np.asarray(v)
    except Exception:  # an object that numpy cannot make an array of
        return repr(v)
    return arr if arr.dtype.kind in "biufcSU" else repr(v)


def write_trident(path: PathLike, features, coords, *, patch_size: int, patch_size_level0: int,
                  level0_magnification: float, target_magnification: float, overlap: int = 0,
                  level0_width: int, level0_height: int, encoder: str, name: Optional[str] = None,
                  extra_attrs: Optional[Mapping[str, Any]] = None,
                  extra_datasets: Optional[Mapping[str, np.ndarray]] = None) -> Path:
    """Write a TRIDENT features file atomically (temp file in the same folder, then ``os.replace``).

    Args:
        path: destination ``.h5`` (parent folders are created).
        features: (N, F) array/tensor, stored as float32 ``features``; N = 0 writes TRIDENT's empty slide.
        coords: (N, 2) level-0 (x, y), stored as int64 ``coords``.
        patch_size, overlap: at the target magnification (px); patch_size_level0: level-0 px.
        level0_magnification, target_magnification, level0_width, level0_height: slide geometry.
        encoder: the patch encoder's name (attribute of ``features``).
        name: slide name (default: the file's stem).
        extra_attrs: provenance attributes written on the file root.
        extra_datasets: further datasets (e.g. STAMP's micrometre coordinates).
    Returns:
        The written path.
    """
    path = Path(path)
    feats = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    coords = np.asarray(coords)
    if feats.ndim != 2:
        raise ValueError(f"features: expected (N, F), got shape {feats.shape}")
    if coords.shape != (feats.shape[0], 2):
        raise ValueError(f"coords: expected shape ({feats.shape[0]}, 2) to match features, got {coords.shape}")
    if patch_size <= 0 or patch_size_level0 <= 0:
        raise ValueError(f"patch_size ({patch_size}) and patch_size_level0 ({patch_size_level0}) must be positive")
    if not 0 <= overlap < patch_size:
        raise ValueError(f"overlap: expected 0 <= overlap < patch_size ({patch_size}), got {overlap}")
    with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
        dset = f.create_dataset("features", data=feats.astype(np.float32, copy=False))
        dset.attrs["encoder"] = str(encoder)
        c = f.create_dataset("coords", data=np.rint(coords).astype(np.int64))
        for k, v in {"patch_size": int(patch_size), "patch_size_level0": int(patch_size_level0),
                     "level0_magnification": level0_magnification,
                     "target_magnification": target_magnification, "overlap": int(overlap),
                     "level0_width": int(level0_width), "level0_height": int(level0_height),
                     "name": name or path.stem}.items():
            c.attrs[k] = v
        for k, v in (extra_attrs or {}).items():
            f.attrs[k] = _attr_value(v)
        for k, v in (extra_datasets or {}).items():
            f.create_dataset(k, data=np.asarray(v))
    return path


def _num(v: float) -> str:
    return f"{int(round(v))}" if abs(v - round(v)) < 1e-6 else f"{v:g}"


def trident_folder(target_magnification: float, patch_size: int, overlap: int, encoder: str) -> str:
    """TRIDENT's relative folder ``<mag>x_<px>px_<ov>px_overlap/features_<encoder>``."""
    return f"{_num(target_magnification)}x_{int(patch_size)}px_{int(overlap)}px_overlap/features_{encoder}"


def convert_slide(src: PathLike, dst_root: PathLike, *, fmt: str, patches_path: Optional[PathLike] = None,
                  stride: Optional[float] = None, encoder: Optional[str] = None,
                  level0_magnification: Optional[float] = None, mpp: Optional[float] = None,
                  overwrite: bool = False) -> tuple[Path, bool]:
    """Convert one CLAM or STAMP feature file to a TRIDENT file under ``dst_root``.

    The geometry is taken from the source (see :func:`~ssm2d_path.io.read_slide`); the source format,
    file, stride source and every source attribute are kept as root attributes (``source_*``).

    * CLAM records no magnification: ``level0_magnification`` is required; the target magnification is
      ``level0_magnification / downsample`` of the patch level. The encoder name comes from ``encoder``
      (CLAM does not record it; "unknown" otherwise). Level-0 width/height come from the patches file's
      ``level_dim * downsample``, else from the extent of the patches (``source_level0_dims="patch_extent"``).
    * STAMP: the target magnification is ``10 * tile_size_px / tile_size_um``; with the level-0 ``mpp``
      the coordinates become level-0 px, else level 0 is taken at the tile resolution
      (``source_coords_unit="tile_px"``). The micrometre coordinates are kept as dataset ``coords_um``.

    Returns:
        (destination path, written); written is False when it existed and ``overwrite`` is False.
    Raises:
        EmptySlideError / SlideFileError from the reader; ValueError for missing required arguments.
    """
    src = Path(src)
    if fmt not in ("clam", "stamp"):
        raise ValueError(f"fmt: expected 'clam' or 'stamp', got {fmt!r}")
    if fmt == "clam" and not level0_magnification:
        raise ValueError("level0_magnification: required for CLAM files (they do not record the magnification)")
    g = read_slide(src, fmt=fmt, patches_path=patches_path, stride=stride, mpp=mpp)
    meta = g.meta
    psl0 = g.patch_size_level0 or g.stride
    overlap_l0 = max(psl0 - g.stride, 0)
    extra_datasets = {}
    if fmt == "clam":
        ds = meta.get("downsample") or (1.0, 1.0)
        patch_size = int(meta["patch_size"]) if meta.get("patch_size") else int(round(psl0 / ds[0]))
        target_mag = float(level0_magnification) / ds[0]
        enc = encoder or "unknown"
        level_dim = (meta.get("attrs") or {}).get("level_dim")
        if level_dim is not None and np.asarray(level_dim).size == 2:
            w, h = (int(round(float(np.asarray(level_dim).ravel()[i]) * ds[i])) for i in (0, 1))
            dims_source = "level_dim"
        else:
            w, h = (int(g.coords[:, i].max()) + psl0 for i in (0, 1))
            dims_source = "patch_extent"
        level0_mag = float(level0_magnification)
        overlap = int(round(overlap_l0 / ds[0]))
    else:
        if meta.get("unit") != "um" or not meta.get("tile_size_um") or not meta.get("tile_size_px"):
            raise SlideFileError(f"{src}: STAMP file without unit='um', tile_size_um and tile_size_px attributes")
        patch_size = int(round(meta["tile_size_px"]))
        target_mag = float(meta["magnification"])
        level0_mag = float(meta["level0_magnification"]) if meta.get("level0_magnification") else target_mag
        enc = encoder or meta.get("encoder") or "unknown"
        w, h = (int(g.coords[:, i].max()) + psl0 for i in (0, 1))
        dims_source = "patch_extent"
        overlap = int(round(overlap_l0 * patch_size / psl0))
        extra_datasets["coords_um"] = meta["coords_um"]
    dst = Path(dst_root) / trident_folder(target_mag, patch_size, overlap, enc) / f"{g.slide_id}.h5"
    if dst.exists() and not overwrite:
        return dst, False
    extra = {"source_format": fmt, "source_file": str(src), "converter": f"ssm2d-path {__version__}",
             "source_stride_source": meta.get("stride_source"), "source_level0_dims": dims_source,
             "source_coords_unit": meta.get("coords_unit", "level0_px")}
    if patches_path is not None:
        extra["source_patches_file"] = str(patches_path)
    for k, v in (meta.get("attrs") or {}).items():
        extra[f"source_attr_{k}"] = v
    write_trident(dst, g.features, g.coords, patch_size=patch_size, patch_size_level0=psl0,
                  level0_magnification=level0_mag, target_magnification=target_mag, overlap=overlap,
                  level0_width=w, level0_height=h, encoder=enc, name=g.slide_id,
                  extra_attrs=extra, extra_datasets=extra_datasets)
    return dst, True
