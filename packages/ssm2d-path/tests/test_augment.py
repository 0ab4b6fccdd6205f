"""Augmentations that keep the 2D structure: dihedral symmetries, crops, feature noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssm2d_path.augment import BagAugment, crop, dihedral, feature_noise
from ssm2d_path.bag import Bag, SlideGrid


def _slide(seed=0, h=5, w=7, stride=512):
    rng = np.random.default_rng(seed)
    m = rng.random((h, w)) < 0.6
    m[0, 0] = m[-1, -1] = True  # bounding box exactly h x w
    r, c = np.nonzero(m)
    coords = np.stack([1024 + c * stride, 2048 + r * stride], 1)
    feats = torch.randn(len(r), 3, generator=torch.Generator().manual_seed(seed))
    return SlideGrid.from_coords("s", feats, coords, stride)


def _dense(slide: SlideGrid) -> np.ndarray:
    """(H, W) grid holding 1 + the patch index (0 empty)."""
    g = np.zeros(slide.shape, np.int64)
    g[slide.rows, slide.cols] = np.arange(slide.num_patches) + 1
    return g


@pytest.mark.parametrize("k", range(8))
def test_dihedral_matches_numpy_rot90_and_flips(k):
    s = _slide()
    t = dihedral(s, k)
    ref = _dense(s)
    if k >= 4:
        ref = np.fliplr(ref)
    ref = np.rot90(ref, k % 4)
    assert np.array_equal(_dense(t), ref)
    assert torch.equal(t.features, s.features)
    # coordinates describe the new layout: rebuilding the grid from them gives the same cells
    again = SlideGrid.from_coords("s", t.features, t.coords, t.stride)
    assert np.array_equal(again.rows, t.rows) and np.array_equal(again.cols, t.cols) and again.shape == t.shape


def test_dihedral_keeps_neighbours_and_all_eight_differ():
    s = _slide(1)
    pairs = lambda g: {tuple(sorted((int(a), int(b)))) for a, b in zip(g[:-1].ravel(), g[1:].ravel()) if a and b} | \
        {tuple(sorted((int(a), int(b)))) for a, b in zip(g[:, :-1].ravel(), g[:, 1:].ravel()) if a and b}  # noqa: E731
    base = pairs(_dense(s))
    layouts = set()
    for k in range(8):
        d = _dense(dihedral(s, k))
        assert pairs(d) == base  # 4-neighbours stay 4-neighbours
        layouts.add(d.tobytes() + bytes(d.shape))
    assert len(layouts) == 8
    with pytest.raises(ValueError, match="k: expected an integer symmetry index"):
        dihedral(s, 8)


def test_crop_keeps_a_window_and_at_least_one_patch():
    s = _slide(2, h=20, w=20)
    rng = np.random.default_rng(0)
    for _ in range(20):
        t = crop(s, 0.6, rng)
        assert 1 <= t.num_patches <= s.num_patches
        # every kept patch keeps its feature and its level-0 coordinate
        key = {tuple(c): i for i, c in enumerate(s.coords.tolist())}
        idx = [key[tuple(c)] for c in t.coords.tolist()]
        assert torch.equal(t.features, s.features[idx])
        span = t.coords.max(0) - t.coords.min(0)
        assert (span // s.stride + 1 <= np.array([20, 20])).all()
    assert crop(s, 1.0, rng) is s
    with pytest.raises(ValueError, match="keep: expected a fraction"):
        crop(s, 0.0, rng)


def test_feature_noise_scale_is_relative_to_the_feature_std():
    feats = torch.randn(4000, 2) * torch.tensor([1.0, 10.0])
    s = SlideGrid.from_coords("s", feats, np.stack([np.arange(4000) * 256, np.zeros(4000)], 1), 256)
    t = feature_noise(s, 0.5, torch.Generator().manual_seed(0))
    diff = (t.features - s.features).std(0)
    assert diff[0] == pytest.approx(0.5, rel=0.1) and diff[1] == pytest.approx(5.0, rel=0.1)
    assert feature_noise(s, 0.0, torch.Generator()) is s
    with pytest.raises(ValueError, match="std: expected a number >= 0"):
        feature_noise(s, -1.0, torch.Generator())


def test_bag_augment_is_a_function_of_its_seed():
    bag = Bag("b", [_slide(3), _slide(4)])
    aug = BagAugment(dihedral=True, crop=0.8, feature_noise=0.3)
    a, b, c = aug(bag, 7), aug(bag, 7), aug(bag, 8)
    for x, y in zip(a.slides, b.slides):
        assert torch.equal(x.features, y.features) and np.array_equal(x.rows, y.rows)
    assert any(not torch.equal(x.features, y.features) for x, y in zip(a.slides, c.slides))
    assert BagAugment()(bag, 0) is bag
