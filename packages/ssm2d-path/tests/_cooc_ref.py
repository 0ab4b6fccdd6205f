"""Shared by test_cooc and test_channel_readout: random small slides and the co-occurrence features
computed by plain loops over level-0 coordinates (the independent reference of models.cooc)."""

from __future__ import annotations

import numpy as np
import torch

from ssm2d_path.bag import SlideGrid


def random_slide(seed, dim=3, shape=(5, 7), fill=0.6, stride=256):
    """A random tissue mask on a small grid, patches in a random order, Gaussian features (float64)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.nonzero(rng.random(shape) < fill)
    perm = rng.permutation(len(rows))
    rows, cols = rows[perm], cols[perm]
    coords = np.stack([cols * stride, rows * stride], 1) + np.array([1000, 3000])
    return SlideGrid.from_coords(f"s{seed}", torch.from_numpy(rng.normal(size=(len(rows), dim))), coords, stride)


def cooc_reference(coords, stride, z, op="min"):
    """Slow loops straight from the definition: neighbours found by comparing level-0 coordinates."""
    z = np.asarray(z, dtype=np.float64)
    num, n = z.shape
    out = np.zeros((num, n * n))
    where = {(int(x), int(y)): i for i, (x, y) in enumerate(coords)}
    for i, (x, y) in enumerate(coords):
        nbs = [where[p] for p in ((x - stride, y), (x + stride, y), (x, y - stride), (x, y + stride)) if p in where]
        for c in range(n):
            for d in range(n):
                vals = [min(z[i, c], z[j, d]) if op == "min" else z[i, c] * z[j, d] for j in nbs]
                out[i, c * n + d] = max(vals) if vals else 0.0
    return out
