"""Local co-occurrence features: "channel c here, channel d in a 4-neighbouring cell" as one channel.

For a slide with per-patch values ``z`` (N, n) (e.g. the ICA components of 2DMambaMIL's ``input_ica``),
:func:`neighbour_cooc` returns (N, n * n) values

    out[i, c * n + d] = max over the tissue 4-neighbours j of i of op(z[i, c], z[j, d])

with ``op`` the minimum ("min") or the product ("prod"), and 0 for a patch without a tissue
neighbour. With "min" a value is large only when channel c is large at the cell *and* channel d is
large at one of its neighbours, so an arrangement such as "an A patch next to a B patch" becomes a
single per-patch channel that a linear layer and max / top-k pooling can read. The features are a
fixed function of the inputs (no parameters); they are invariant under flips and 90-degree rotations
of the grid (the set of 4-neighbours does not change).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..bag import SlideGrid

__all__ = ["COOC_OPS", "neighbour_cooc", "neighbour_index"]

COOC_OPS = ("min", "prod")
_SHIFTS = ((-1, 0), (1, 0), (0, -1), (0, 1))


def neighbour_index(slide: SlideGrid) -> Tensor:
    """(N, 4) int64: for each patch of ``slide``, the index of the patch above, below, left and right
    of it on the grid, -1 where that cell is empty or off the grid."""
    h, w = slide.shape
    dev = slide.features.device
    rows, cols = slide.index_tensor(0), slide.index_tensor(1)
    idx = torch.full((h + 2, w + 2), -1, dtype=torch.long, device=dev)  # one empty cell of border
    idx[rows + 1, cols + 1] = torch.arange(rows.numel(), device=dev)
    return torch.stack([idx[rows + 1 + dr, cols + 1 + dc] for dr, dc in _SHIFTS], 1)


def neighbour_cooc(slide: SlideGrid, z: Tensor, op: str = "min") -> Tensor:
    """Co-occurrence of every pair of channels of ``z`` between each patch and its 4-neighbours.

    Args:
        slide: the slide (its grid positions; its features are not used).
        z: (N, n) per-patch values, N = slide.num_patches, finite.
        op: "min" or "prod".
    Returns:
        (N, n * n) in z's dtype: ``out[i, c * n + d] = max_j op(z[i, c], z[j, d])`` over the tissue
        4-neighbours j of patch i, 0 where patch i has none.
    Raises:
        ValueError naming ``z`` (shape, patch count, non-finite values) or ``op``.
    """
    if op not in COOC_OPS:
        raise ValueError(f"op: must be one of {', '.join(COOC_OPS)}, got {op!r}")
    if not isinstance(z, Tensor) or z.dim() != 2 or z.shape[1] < 1:
        raise ValueError(f"z: expected an (N, n) tensor with n >= 1, got {getattr(z, 'shape', type(z).__name__)}")
    if z.shape[0] != slide.num_patches:
        raise ValueError(f"z: has {z.shape[0]} rows, slide {slide.slide_id!r} has {slide.num_patches} patches")
    if not torch.isfinite(z).all():
        raise ValueError("z: holds NaN or infinite values")
    num, n = z.shape
    nb = neighbour_index(slide).to(z.device)  # (N, 4)
    here = z[:, :, None]  # (N, n, 1): channel c at the cell
    best = z.new_full((num, n, n), float("-inf"))
    for k in range(nb.shape[1]):
        j = nb[:, k]
        there = z[j.clamp_min(0)][:, None, :]  # (N, 1, n): channel d at the neighbour
        v = torch.minimum(here, there) if op == "min" else here * there
        v = torch.where((j >= 0)[:, None, None], v, torch.full_like(v, float("-inf")))
        best = torch.maximum(best, v)
    best = torch.where(torch.isinf(best), torch.zeros_like(best), best)  # no tissue neighbour: 0
    return best.reshape(num, n * n)
