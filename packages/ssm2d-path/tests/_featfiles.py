"""Writers of CLAM / TRIDENT / STAMP files for the tests, written with h5py directly (not the package)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import torch


def lattice(rng, h, w, keep=0.7):
    """Random tissue cells on an h x w lattice, with every border row/column occupied so the
    bounding box is exactly h x w. Returns (rows, cols) int64 in random order."""
    m = rng.random((h, w)) < keep
    m[0, rng.integers(w)] = m[-1, rng.integers(w)] = True
    m[rng.integers(h), 0] = m[rng.integers(h), -1] = True
    r, c = np.nonzero(m)
    p = rng.permutation(len(r))
    return r[p].astype(np.int64), c[p].astype(np.int64)


def write_trident(path, feats, coords, *, psl0, ps=256, overlap=0, l0mag=40.0, tmag=20.0, encoder="enc", w=100000, h=80000):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        d = f.create_dataset("features", data=np.asarray(feats, np.float32))
        d.attrs["encoder"] = encoder
        c = f.create_dataset("coords", data=np.asarray(coords, np.int64).reshape(-1, 2))
        c.attrs.update({"patch_size": ps, "patch_size_level0": psl0, "level0_magnification": l0mag,
                        "target_magnification": tmag, "overlap": overlap, "level0_width": w, "level0_height": h,
                        "name": path.stem})
    return path


def write_clam_patches(path, coords, *, patch_size=256, patch_level=0, downsample=(1.0, 1.0), level_dim=(5000, 4000)):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        c = f.create_dataset("coords", data=np.asarray(coords, np.int64))
        c.attrs.update({"patch_size": patch_size, "patch_level": patch_level, "downsample": np.asarray(downsample),
                        "level_dim": np.asarray(level_dim), "downsampled_level_dim": np.asarray(level_dim),
                        "name": path.stem})
    return path


def write_clam_h5(path, feats, coords=None):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=np.asarray(feats, np.float32))
        if coords is not None:
            f.create_dataset("coords", data=np.asarray(coords, np.int32))
    return path


def write_clam_pt(path, feats):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torch.as_tensor(np.asarray(feats, np.float32)), path)
    return path


def write_stamp(path, feats, coords_um, *, tile_um=256.0, tile_px=224, extractor="ext", unit="um"):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("feats", data=np.asarray(feats, np.float16))
        f.create_dataset("coords", data=np.asarray(coords_um, np.float64))
        if unit is not None:
            f.attrs.update({"unit": unit, "tile_size_um": tile_um, "tile_size_px": tile_px, "extractor": extractor})
    return path
