"""The patch grid of one slide and its file: TRIDENT's ``<slide>_patches.h5``.

The file holds one dataset ``coords`` (N, 2) int64, the level-0 top-left (x, y) of each patch, with
TRIDENT's attributes on it (``patch_size``, ``patch_size_level0``, ``level0_magnification``,
``target_magnification``, ``overlap``, ``level0_width``, ``level0_height``, ``name``) plus ``mpp``
(level-0 micrometres per pixel), ``target_mpp``, ``stride_level0``, ``read_level`` (the pyramid
level patches are read from) and ``slide_path``. TRIDENT, CLAM-style tools and our readers all
understand it; a slide without tissue is an empty (0, 2) dataset.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np

from ..io.errors import SlideFileError

__all__ = ["PatchGrid", "grid_folder", "patches_path", "read_coords", "write_coords"]

PathLike = Union[str, os.PathLike]
PATCHES_SUFFIX = "_patches.h5"
REQUIRED_ATTRS = ("patch_size", "patch_size_level0", "level0_magnification", "target_magnification", "overlap",
                  "level0_width", "level0_height")


@dataclass
class PatchGrid:
    """Where the patches of one slide are.

    Attributes:
        name: slide name (file stem).
        coords: (N, 2) int64 level-0 top-left (x, y), in raster order (rows of y, then x).
        patch_size: patch side at the target resolution (px); overlap: at the target resolution (px).
        patch_size_level0: patch side in level-0 px; stride_level0: level-0 px between neighbours.
        level0_magnification, target_magnification: objective powers; mpp: level-0 um/px;
        target_mpp: um/px of the patches as fed to an encoder.
        level0_width, level0_height: level-0 slide size; read_level: pyramid level patches are read from.
        slide_path: the slide file; attrs: further provenance (tissue-detection parameters, versions).
    """

    name: str
    coords: np.ndarray
    patch_size: int
    patch_size_level0: int
    stride_level0: int
    overlap: int
    level0_magnification: float
    target_magnification: float
    mpp: float
    target_mpp: float
    level0_width: int
    level0_height: int
    read_level: int = 0
    slide_path: str = ""
    attrs: dict = field(default_factory=dict)

    def __post_init__(self):
        self.coords = np.asarray(self.coords, dtype=np.int64).reshape(-1, 2)

    @property
    def num_patches(self) -> int:
        return int(self.coords.shape[0])

    def folder(self) -> str:
        """TRIDENT's ``<mag>x_<px>px_<ov>px_overlap`` folder of this grid."""
        return grid_folder(self.target_magnification, self.patch_size, self.overlap)


def _num(v: float) -> str:
    return f"{int(round(v))}" if abs(v - round(v)) < 1e-6 else f"{v:g}"


def grid_folder(target_magnification: float, patch_size: int, overlap: int) -> str:
    """``<mag>x_<px>px_<ov>px_overlap`` (TRIDENT's name for a patching setting)."""
    return f"{_num(target_magnification)}x_{int(patch_size)}px_{int(overlap)}px_overlap"


def patches_path(job_dir: PathLike, grid_or_folder: Union[PatchGrid, str], name: Optional[str] = None) -> Path:
    """``<job_dir>/<folder>/patches/<name>_patches.h5``."""
    if isinstance(grid_or_folder, PatchGrid):
        folder, name = grid_or_folder.folder(), name or grid_or_folder.name
    else:
        folder = grid_or_folder
    if not name:
        raise ValueError("name: the slide name is needed for the patches file's path")
    return Path(job_dir) / folder / "patches" / f"{name}{PATCHES_SUFFIX}"


def _plain(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool, np.generic)):
        return v
    if v is None:
        return "None"
    arr = np.asarray(v)
    return arr if arr.dtype.kind in "biuf" else repr(v)


def write_coords(path: PathLike, grid: PatchGrid, *, extra_attrs: Optional[Mapping[str, Any]] = None) -> Path:
    """Write ``grid`` as a TRIDENT patches file, atomically (temp name, then rename)."""
    import h5py

    from ssm2d_nn.fileio import atomic_output

    path = Path(path)
    with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
        d = f.create_dataset("coords", data=grid.coords.astype(np.int64))
        for k, v in {"patch_size": int(grid.patch_size), "patch_size_level0": int(grid.patch_size_level0),
                     "stride_level0": int(grid.stride_level0), "overlap": int(grid.overlap),
                     "level0_magnification": float(grid.level0_magnification),
                     "target_magnification": float(grid.target_magnification), "mpp": float(grid.mpp),
                     "target_mpp": float(grid.target_mpp), "level0_width": int(grid.level0_width),
                     "level0_height": int(grid.level0_height), "read_level": int(grid.read_level),
                     "name": grid.name, "slide_path": str(grid.slide_path)}.items():
            d.attrs[k] = v
        for k, v in {**grid.attrs, **(extra_attrs or {})}.items():
            f.attrs[k] = _plain(v)
    return path


def read_coords(path: PathLike) -> PatchGrid:
    """Read a patches file written by :func:`write_coords` or by TRIDENT (attributes it lacks, such as
    ``mpp``, are derived: ``mpp = 10 / level0_magnification``, stride from patch size and overlap).

    Raises:
        SlideFileError naming the file when it is unreadable, lacks ``coords`` or a required attribute,
        or holds coordinates of the wrong shape.
    """
    import h5py

    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except (OSError, ValueError) as e:
        raise SlideFileError(f"{path}: not a readable HDF5 patches file ({e})") from None
    with f:
        if "coords" not in f:
            raise SlideFileError(f"{path}: no 'coords' dataset (expected a TRIDENT patches file)")
        d = f["coords"]
        a = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in d.attrs.items()}
        missing = [k for k in REQUIRED_ATTRS if k not in a]
        if missing:
            raise SlideFileError(f"{path}: 'coords' lacks the attribute(s) {', '.join(missing)}")
        coords = np.asarray(d[()])
        root = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    if coords.size and (coords.ndim != 2 or coords.shape[1] != 2):
        raise SlideFileError(f"{path}: 'coords' must be (N, 2), got shape {coords.shape}")
    ps, psl0, ov = int(a["patch_size"]), int(a["patch_size_level0"]), int(a["overlap"])
    l0mag, tmag = float(a["level0_magnification"]), float(a["target_magnification"])
    mpp = float(a["mpp"]) if "mpp" in a else 10.0 / l0mag
    stride = int(a["stride_level0"]) if "stride_level0" in a else int(round((ps - ov) * psl0 / ps))
    name = str(a.get("name") or path.name[: -len(PATCHES_SUFFIX)] if path.name.endswith(PATCHES_SUFFIX)
               else a.get("name") or path.stem)
    return PatchGrid(name=name, coords=coords.reshape(-1, 2), patch_size=ps, patch_size_level0=psl0,
                     stride_level0=stride, overlap=ov, level0_magnification=l0mag, target_magnification=tmag,
                     mpp=mpp, target_mpp=float(a.get("target_mpp", mpp * psl0 / ps)),
                     level0_width=int(a["level0_width"]), level0_height=int(a["level0_height"]),
                     read_level=int(a.get("read_level", 0)), slide_path=str(a.get("slide_path", "")),
                     attrs=root)
