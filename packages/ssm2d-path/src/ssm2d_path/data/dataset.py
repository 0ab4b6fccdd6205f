"""Bags of slides for MIL: one per slide, or one per patient with all of that patient's slides."""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import h5py
import torch
from torch.utils.data import Dataset

from ..bag import Bag, SlideGrid
from ..io import EmptySlideError, SlideFileError, read_slide
from ..io.readers import H5_SUFFIXES, PT_SUFFIXES, is_patches_file
from .labels import LabelTable

__all__ = ["BagDataset", "CohortError", "Example", "index_feature_files"]

logger = logging.getLogger(__name__)


class CohortError(SlideFileError):
    """Feature files of the cohort are unusable; the message lists every one with its problem."""

    def __init__(self, problems: list[tuple[str, str]], hint: str = ""):
        self.problems = list(problems)
        shown = "; ".join(f"{p}" for _, p in self.problems[:20])
        more = f"; and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
        super().__init__(f"{len(self.problems)} feature file(s) of the cohort are unusable: {shown}{more}"
                         + (f". {hint}" if hint else ""))


@dataclass
class Example:
    """One bag and its target: ``label`` (classification) or ``time`` and ``censorship`` (survival)."""

    bag: Bag
    label: Optional[int] = None
    time: Optional[float] = None
    censorship: Optional[int] = None


def index_feature_files(feature_dir: Union[str, Path]) -> dict[str, Path]:
    """Slide id (file stem) -> feature file in a folder.

    Looks in ``feature_dir`` itself and, for a CLAM feature folder, in its ``h5_files`` and
    ``pt_files``; an ``.h5`` wins over a ``.pt`` of the same slide (it also holds the coordinates).
    CLAM patches files (coords only) are not feature files and are left out.
    """
    root = Path(feature_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"feature_dir: {root} is not a folder")
    found: dict[str, Path] = {}
    for sub in (root / "pt_files", root, root / "h5_files"):  # later folders win
        if not sub.is_dir():
            continue
        for suffixes in (PT_SUFFIXES, H5_SUFFIXES):
            for f in sorted(sub.iterdir()):
                if f.is_file() and f.suffix.lower() in suffixes and not f.name.startswith("."):
                    if f.suffix.lower() in H5_SUFFIXES and is_patches_file(f):
                        continue
                    found[f.stem] = f
    return found


def _probe(path: Path) -> tuple[int, int]:
    """(N, F) of a feature file without reading its features."""
    if path.suffix.lower() in PT_SUFFIXES:
        from ssm2d_nn.fileio import load_weights

        try:
            t = load_weights(path, what="feature file", mmap=True)
        except (OSError, ValueError) as e:  # says what is wrong with the file
            raise SlideFileError(str(e)) from None
        if isinstance(t, dict) and "features" in t:
            t = t["features"]
        if not isinstance(t, torch.Tensor) or t.ndim != 2:
            raise SlideFileError(f"{path}: expected a (N, F) tensor of features")
        return int(t.shape[0]), int(t.shape[1])
    try:
        with h5py.File(path, "r") as f:
            key = "feats" if "feats" in f else "features"
            if key not in f:
                raise SlideFileError(f"{path}: no 'features' or 'feats' dataset (found {sorted(f.keys())})")
            shape = f[key].shape
    except (OSError, ValueError) as e:
        if isinstance(e, SlideFileError):
            raise
        raise SlideFileError(f"{path}: cannot be opened as HDF5 (truncated or not an HDF5 file): {e}") from e
    if len(shape) != 2:
        raise SlideFileError(f"{path}: features must be 2-D (N, F), got shape {shape}")
    return int(shape[0]), int(shape[1])


class BagDataset(Dataset):
    """Bags with their targets, read lazily from a folder of feature files.

    Args:
        feature_dir: folder of ``<slide_id>.h5``/``.pt`` (a TRIDENT ``features_<encoder>`` folder, a STAMP
            folder, or a CLAM feature folder with ``h5_files``/``pt_files``).
        table: the label table; its slide ids are matched to the file stems.
        level: "slide" (one bag per slide) or "patient" (one bag per case, its slides concatenated in
            table order, each keeping its own grid).
        fmt: file format or "auto"; patches_dir: CLAM ``patches`` folder (needed for ``.pt`` files);
        stride: fallback stride (see :func:`~ssm2d_path.io.read_slide`); mpp: STAMP level-0 mpp.
        cache_bytes: loaded bags are kept in memory up to this many bytes of features (LRU).
        strict: raise on unusable files instead of reporting and skipping them: one :class:`CohortError`
            listing every unusable file with its problem, after all were checked.
        validate: read every feature file once, completely, when the dataset is built (features and
            coordinates, their lengths, NaN/inf, duplicate or off-lattice coordinates, the grid), so a
            bad file is found before any training instead of in the middle of it. Without it only the
            shape is probed and a bad file fails when its bag is read.
        max_cells: with ``validate``, a slide whose tissue-cropped grid (rows x cols) holds more cells
            is unusable (an outlier patch far from the tissue makes a grid no model can allocate).

    Attributes:
        ids: bag ids with features, in table order. Slides with 0 patches, unusable files (unless
            ``strict``) and slides of the table without a feature file are left out, logged, and listed
            in ``skipped`` as ``(slide_id, reason)``; feature files without a table row are ignored (logged).
        files: bag id -> its feature files (for manifests).
        feature_dim: F, common to every file.
    """

    def __init__(self, feature_dir: Union[str, Path], table: LabelTable, *, level: str = "slide",
                 fmt: str = "auto", patches_dir: Optional[Union[str, Path]] = None, stride: Optional[float] = None,
                 mpp: Optional[float] = None, cache_bytes: int = 2 << 30, strict: bool = False,
                 validate: bool = False, max_cells: Optional[int] = None):
        if level not in ("slide", "patient"):
            raise ValueError(f"level: expected 'slide' or 'patient', got {level!r}")
        self.feature_dir, self.table, self.level, self.fmt = Path(feature_dir), table, level, fmt
        self.patches_dir = None if patches_dir is None else Path(patches_dir)
        self.stride, self.mpp, self.cache_bytes = stride, mpp, int(cache_bytes)
        self.skipped: list[tuple[str, str]] = []
        self._cache: "OrderedDict[str, Bag]" = OrderedDict()
        self._cached_bytes = 0

        available = index_feature_files(self.feature_dir)
        table_slides = table.slides()
        extra = sorted(set(available) - set(table_slides))
        if extra:
            logger.info("%d feature file(s) in %s have no row in the label table and are ignored: %s",
                        len(extra), self.feature_dir, ", ".join(extra[:20]) + (" ..." if len(extra) > 20 else ""))
        missing = [s for s in table_slides if s not in available]
        if missing:
            logger.warning("%d slide(s) of the label table have no feature file in %s: %s", len(missing),
                           self.feature_dir, ", ".join(missing[:50]) + (" ..." if len(missing) > 50 else ""))
            self.skipped += [(s, "no feature file") for s in missing]

        usable: dict[str, Path] = {}
        dims: dict[int, str] = {}
        bad: list[tuple[str, str]] = []
        for s in table_slides:
            if s not in available:
                continue
            try:
                n, d = _probe(available[s])
                if n and validate:
                    self._validate(available[s], max_cells)
            except EmptySlideError:
                n, d = 0, 0
            except SlideFileError as e:
                bad.append((s, str(e)))
                continue
            if n == 0:
                logger.warning("skipping slide %s: empty (0 patches) in %s", s, available[s])
                self.skipped.append((s, "empty: 0 patches"))
                continue
            dims.setdefault(d, str(available[s]))
            usable[s] = available[s]
        if bad and strict:
            raise CohortError(bad, "Fix or remove them, or leave them out with --skip-bad-files "
                                   "(data.skip_bad_files: true; they are recorded in the manifest and results)")
        for s, why in bad:
            logger.warning("skipping slide %s: %s", s, why)
            self.skipped.append((s, f"unusable: {why}"))
        if len(dims) > 1:
            raise ValueError(f"feature_dir {self.feature_dir}: feature files disagree on the feature dimension: "
                             + "; ".join(f"F={d} in {p}" for d, p in dims.items()))
        self.feature_dim: Optional[int] = next(iter(dims), None)

        self.files: dict[str, list[Path]] = {}
        if level == "slide":
            for s in table_slides:
                if s in usable:
                    self.files[s] = [usable[s]]
        else:
            for c in table.cases():
                paths = [usable[s] for s in table.slides_of(c) if s in usable]
                if paths:
                    self.files[c] = paths
        self.ids: list[str] = list(self.files)
        if not self.ids:
            logger.warning("no bag has features: %d slide(s) skipped", len(self.skipped))

    def _validate(self, path: Path, max_cells: Optional[int]) -> None:
        """Read one file completely (every check of the readers) and check its grid's size."""
        try:
            g = self._read(path)
        except SlideFileError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SlideFileError(f"{path}: {e}") from e
        h, w = g.shape
        if max_cells is not None and h * w > max_cells:
            lo, hi = g.coords.min(axis=0), g.coords.max(axis=0)
            raise SlideFileError(
                f"{path}: its grid is {h:,} x {w:,} = {h * w:,} cells, more than the budget of {max_cells:,} "
                f"(data.max_grid_cells); the patches span x {lo[0]}..{hi[0]}, y {lo[1]}..{hi[1]} at stride "
                f"{g.stride}: an outlier patch far from the tissue? (raise data.max_grid_cells for a slide "
                f"this large)")

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cache"], state["_cached_bytes"] = OrderedDict(), 0  # what goes to another process: no bags
        return state

    def __len__(self) -> int:
        return len(self.ids)

    def _read(self, path: Path) -> SlideGrid:
        patches = None
        if self.patches_dir is not None:
            cand = self.patches_dir / f"{path.stem}.h5"
            patches = cand if cand.is_file() else None
        return read_slide(path, fmt=self.fmt, patches_path=patches, stride=self.stride, mpp=self.mpp)

    def bag(self, bag_id: str) -> Bag:
        """The bag of ``bag_id`` (from the cache when it is there)."""
        if bag_id in self._cache:
            self._cache.move_to_end(bag_id)
            return self._cache[bag_id]
        if bag_id not in self.files:
            raise KeyError(f"bag {bag_id!r} is not in this dataset ({len(self.ids)} bags)")
        bag = Bag(bag_id, [self._read(p) for p in self.files[bag_id]])
        size = sum(s.features.numel() * s.features.element_size() for s in bag.slides)
        if size <= self.cache_bytes:
            self._cache[bag_id] = bag
            self._cached_bytes += size
            while self._cached_bytes > self.cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached_bytes -= sum(s.features.numel() * s.features.element_size() for s in old.slides)
        return bag

    def target(self, bag_id: str) -> tuple[Optional[int], Optional[float], Optional[int]]:
        """(label, time, censorship) of a bag; the unused entries are None."""
        if self.table.task == "classification":
            return self.table.label_of(bag_id, level=self.level), None, None
        t, c = self.table.survival_of(bag_id, level=self.level)
        return None, t, c

    def __getitem__(self, key: Union[int, str]) -> Example:
        bag_id = self.ids[key] if isinstance(key, int) else key
        label, time, cens = self.target(bag_id)
        return Example(self.bag(bag_id), label, time, cens)

    def __repr__(self) -> str:
        return (f"BagDataset({str(self.feature_dir)!r}, level={self.level!r}, bags={len(self.ids)}, "
                f"skipped={len(self.skipped)}, feature_dim={self.feature_dim})")
