"""The canonical in-memory bag: what every reader produces and every MIL model consumes.

A slide is a set of N patches with features (N, F), their level-0 top-left coordinates (x, y) and
the slide's own level-0 stride between neighbouring patches. Its 2D grid is cropped to the tissue:
``row = (y - min y) / stride``, ``col = (x - min x) / stride``, shape ``(max row + 1, max col + 1)``;
a cell holds at most one patch and ``mask`` marks the cells that hold one. Nothing is ever padded to
a dataset-wide canvas: a model that needs a dense grid builds one of ``rows * cols`` cells per slide
(see :meth:`SlideGrid.scatter`), and its memory follows the tissue's bounding box, not a canvas.

A bag is one or more slides (several slides of one patient form one patient bag when the task is
per patient); the patches of a bag are the concatenation of its slides' patches, in slide order.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["Bag", "SlideGrid", "grid_indices"]


def grid_indices(coords: np.ndarray, stride: int, *, name: str = "coords") -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Grid (row, col) of each patch and the grid shape, cropped to the patches' bounding box.

    Args:
        coords: (N, 2) level-0 top-left corners (x, y), N >= 1.
        stride: level-0 pixels between neighbouring patches (> 0).
    Returns:
        rows (N,) int64, cols (N,) int64, (H, W).
    Raises:
        ValueError naming ``name`` when coordinates are off the stride lattice or two patches share a cell.
    """
    coords = np.asarray(coords)
    if coords.ndim != 2 or coords.shape[1] != 2 or coords.shape[0] == 0:
        raise ValueError(f"{name}: expected an (N, 2) array of (x, y) with N >= 1, got shape {coords.shape}")
    if stride <= 0:
        raise ValueError(f"{name}: stride must be positive, got {stride}")
    origin = coords.min(axis=0)
    offset = coords - origin
    cells = np.rint(offset / stride).astype(np.int64)
    # Tolerate rounding of float coordinates (STAMP stores micrometres) but not an off-lattice layout.
    if np.abs(offset - cells * stride).max() > 0.25 * stride:
        raise ValueError(f"{name}: coordinates are not on a lattice of stride {stride} (level-0 px)")
    cols, rows = cells[:, 0], cells[:, 1]
    shape = (int(rows.max()) + 1, int(cols.max()) + 1)
    flat = rows * shape[1] + cols
    if np.unique(flat).size != flat.size:
        raise ValueError(f"{name}: two patches fall into the same grid cell at stride {stride}")
    return rows, cols, shape


@dataclass
class SlideGrid:
    """One slide: features, level-0 coordinates and its tissue-cropped grid.

    Attributes:
        slide_id: the slide's id (file stem).
        features: (N, F) float tensor.
        coords: (N, 2) int64 level-0 (x, y) of each patch's top-left corner.
        stride: level-0 pixels between neighbouring patches of this slide.
        rows, cols: (N,) int64 grid position of each patch.
        shape: (H, W) of the grid cropped to the tissue bounding box.
        patch_size_level0: level-0 size of one patch (equals stride without overlap).
        meta: reader-specific attributes kept for provenance (source format, encoder, mpp...).
    """

    slide_id: str
    features: Tensor
    coords: np.ndarray
    stride: int
    rows: np.ndarray
    cols: np.ndarray
    shape: tuple[int, int]
    patch_size_level0: Optional[int] = None
    meta: dict = field(default_factory=dict)
    # The grid's index tensors per (name, device) (index_tensor, flat_index, mask, raster_order), made once:
    # each is a host-to-device copy, and a blocking one drains the device queue, which a model that
    # asks for them per layer would otherwise pay several times per step. Not part of the grid's
    # value: dataclasses.replace and to() start with an empty cache.
    _device_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def from_coords(cls, slide_id: str, features: Tensor, coords: np.ndarray, stride: int, **kw) -> "SlideGrid":
        """Build the grid from coordinates and the slide's level-0 stride (see :func:`grid_indices`)."""
        if features.ndim != 2 or features.shape[0] != len(coords):
            raise ValueError(f"{slide_id}: features {tuple(features.shape)} do not match {len(coords)} coordinates")
        rows, cols, shape = grid_indices(coords, stride, name=f"{slide_id}: coords")
        return cls(slide_id, features, np.asarray(coords).astype(np.int64), int(stride), rows, cols, shape, **kw)

    @property
    def num_patches(self) -> int:
        return int(self.features.shape[0])

    def _cached(self, key: str, make):
        device = self.features.device
        hit = self._device_cache.get((key, device))
        if hit is None:
            hit = self._device_cache[(key, device)] = make(device)
        return hit

    @staticmethod
    def _upload(a: np.ndarray, device: torch.device) -> Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
        if device.type != "cuda":
            return t.to(device)
        # From pinned memory, not blocking: the copy queues behind the device's work instead of
        # waiting for all of it (a pageable copy synchronises the stream).
        return t.pin_memory().to(device, non_blocking=True)

    @property
    def mask(self) -> Tensor:
        """(H, W) bool, True where a cell holds a patch (on the features' device). Made once per device
        and shared: read it, do not modify it."""
        def make(device):
            m = torch.zeros(self.shape, dtype=torch.bool, device=device)
            m.view(-1)[self.flat_index()] = True
            return m
        return self._cached("mask", make)

    def index_tensor(self, axis: int) -> Tensor:
        """rows (axis 0) or cols (axis 1) as an int64 tensor on the features' device (made once per
        device and shared: do not modify it)."""
        a = self.rows if axis == 0 else self.cols
        return self._cached(f"index{axis}", lambda device: self._upload(a, device))

    def flat_index(self) -> Tensor:
        """(N,) row-major cell index ``row * W + col`` on the features' device (made once per device
        and shared: do not modify it)."""
        w = self.shape[1]
        return self._cached("flat", lambda device: self._upload(self.rows.astype(np.int64) * w + self.cols, device))

    def raster_order(self) -> tuple[Tensor, Tensor]:
        """(order, inverse), (N,) int64 each on the features' device: ``x[order]`` lists the patches
        row by row, left to right, and ``y[inverse]`` puts a raster-ordered y back in patch order.
        Made once per device and shared: do not modify them."""
        def make(device):
            order = np.lexsort((self.cols, self.rows))
            inverse = np.empty_like(order)
            inverse[order] = np.arange(order.size)
            both = self._upload(np.stack([order, inverse]), device)
            return both[0], both[1]
        return self._cached("raster", make)

    def scatter(self, x: Tensor, fill: float = 0.0) -> Tensor:
        """Patches to a dense grid: (N, C) -> (C, H, W); empty cells get ``fill``. Memory: C*H*W."""
        h, w = self.shape
        # Written straight into the channels-first layout: filling (H*W, C) and transposing would
        # allocate and copy a second C*H*W grid.
        out = x.new_full((x.shape[1], h * w), fill)
        out[:, self.flat_index()] = x.t()
        return out.view(x.shape[1], h, w)

    def gather(self, grid: Tensor) -> Tensor:
        """Dense grid back to patches: (C, H, W) -> (N, C)."""
        c = grid.shape[0]
        # index_select, not advanced indexing: its backward is an index_add (one add per cell), where
        # advanced indexing's backward sorts the indices (4 ms per 150k-patch layer on a GPU).
        return torch.index_select(grid.reshape(c, -1), 1, self.flat_index()).t()

    def to(self, device, dtype: Optional[torch.dtype] = None) -> "SlideGrid":
        return replace(self, features=self.features.to(device=device, dtype=dtype or self.features.dtype))


@dataclass
class Bag:
    """One training example: a slide, or all slides of a patient.

    Attributes:
        bag_id: slide id or case (patient) id.
        slides: the slides, each with its own grid (at least one).
    """

    bag_id: str
    slides: list[SlideGrid]

    def __post_init__(self):
        if not self.slides:
            raise ValueError(f"bag {self.bag_id!r} has no slides")

    @property
    def features(self) -> Tensor:
        """(N_total, F): the slides' features concatenated in slide order."""
        if len(self.slides) == 1:
            return self.slides[0].features
        return torch.cat([s.features for s in self.slides])

    @property
    def num_patches(self) -> int:
        return sum(s.num_patches for s in self.slides)

    @property
    def feature_dim(self) -> int:
        return int(self.slides[0].features.shape[1])

    def to(self, device, dtype: Optional[torch.dtype] = None) -> "Bag":
        return Bag(self.bag_id, [s.to(device, dtype) for s in self.slides])

    def split(self, x: Tensor) -> Sequence[Tensor]:
        """Split a per-patch tensor (N_total, ...) into per-slide pieces."""
        return torch.split(x, [s.num_patches for s in self.slides])
