"""The level-0 stride of a slide's patch lattice: read from attributes, given, or inferred.

The stride is the spacing of the *coordinates*, not the patch size: with overlapping patches the
lattice stride is ``patch_size_level0 - overlap_level0``, and that is what the grid must use (two
neighbouring patches then sit in neighbouring cells).
"""

from __future__ import annotations

import math
from functools import reduce
from typing import Optional

import numpy as np

from ..bag import grid_indices

__all__ = ["infer_stride", "infer_spacing", "fits_lattice"]

_MAX_REFINE = 4


def _axis_diffs(c: np.ndarray, axis: int, tol: float) -> np.ndarray:
    """Positive differences along ``axis`` between consecutive patches of the same line."""
    other = 1 - axis
    order = np.lexsort((c[:, axis], c[:, other]))
    s = c[order]
    same_line = np.abs(s[1:, other] - s[:-1, other]) <= tol
    d = s[1:, axis] - s[:-1, axis]
    return d[same_line & (d > tol)]


def _all_multiples(d: np.ndarray, step: float, tol: float) -> bool:
    q = d / step
    return bool(np.all(np.abs(q - np.rint(q)) * step <= max(tol, 0.01 * step)))


def infer_spacing(coords) -> Optional[float]:
    """Lattice spacing of a set of patch coordinates (float version of :func:`infer_stride`).

    The spacing is the most common positive difference between nearest neighbours along x (patches of
    one row) and along y (patches of one column). Missing patches only add larger multiples of it, so
    the mode survives them; if some differences are not multiples of the mode (e.g. a slide where most
    neighbours are two cells apart) the greatest common step of all differences is used instead.

    Args:
        coords: (N, 2) (x, y), integer or float.
    Returns:
        The spacing, or None when it cannot be determined (fewer than two distinct positions).
    """
    c = np.asarray(coords, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] != 2:
        raise ValueError(f"coords: expected an (N, 2) array of (x, y), got shape {c.shape}")
    if len(c) < 2:
        return None
    scale = float(np.abs(c).max()) or 1.0
    tol = 1e-6 * scale
    d = np.concatenate([_axis_diffs(c, 0, tol), _axis_diffs(c, 1, tol)])
    if d.size == 0:
        # No two patches share a row or a column: fall back to the gaps between distinct columns/rows.
        gaps = [np.diff(np.unique(np.round(c[:, a] / tol) * tol)) for a in (0, 1)]
        d = np.concatenate(gaps)
        d = d[d > tol]
        if d.size == 0:
            return None
    integer = bool(np.all(c == np.rint(c)))
    rounded = np.rint(d) if integer else np.round(d, 6)
    values, counts = np.unique(rounded, return_counts=True)
    mode = float(values[np.argmax(counts)])  # ties -> the smallest value (np.unique sorts)
    if _all_multiples(d, mode, tol):
        return mode
    # A common step much finer than the mode is a glitch, not a lattice (and its grid could be huge):
    # keep the mode then, and let the grid builder reject the off-lattice patches.
    if integer:
        g = float(reduce(math.gcd, (int(v) for v in values)))
        return g if mode / g <= _MAX_REFINE else mode
    smallest = float(values[0])
    if mode / smallest <= _MAX_REFINE and _all_multiples(d, smallest, tol):
        return smallest
    return mode


def infer_stride(coords) -> int:
    """Level-0 stride (pixels) of integer patch coordinates.

    Args:
        coords: (N, 2) level-0 (x, y) of the patches' top-left corners, N >= 2.
    Returns:
        The most common positive nearest-neighbour difference along x and y (see
        :func:`infer_spacing`), rounded to an integer >= 1.
    Raises:
        ValueError when the coordinates do not determine a stride (fewer than two distinct positions).
    """
    s = infer_spacing(coords)
    if s is None:
        raise ValueError("coords: cannot infer a stride from fewer than two distinct patch positions")
    s = int(round(s))
    if s < 1:
        raise ValueError(f"coords: inferred stride {s} is not positive")
    return s


def fits_lattice(coords, stride: float) -> bool:
    """True when ``coords`` lie on a lattice of ``stride`` with at most one patch per cell."""
    try:
        grid_indices(np.asarray(coords), stride)
    except ValueError:
        return False
    return True
