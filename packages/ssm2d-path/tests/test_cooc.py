"""Local co-occurrence features (ssm2d_path.models.cooc) and 2DMambaMIL's input_cooc option."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _cooc_ref import cooc_reference, random_slide  # noqa: E402

from ssm2d_path.bag import Bag, SlideGrid
from ssm2d_path.models import TwoDMambaMIL
from ssm2d_path.models.cooc import neighbour_cooc, neighbour_index


@pytest.mark.parametrize("op", ["min", "prod"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_neighbour_cooc_matches_the_loop_reference(op, seed):
    s = random_slide(100 + seed, dim=3, fill=0.55 + 0.1 * seed)
    z = torch.from_numpy(np.random.default_rng(seed).normal(size=(s.num_patches, 3)))
    got = neighbour_cooc(s, z, op)
    assert got.shape == (s.num_patches, 9) and got.dtype == z.dtype
    np.testing.assert_allclose(got.numpy(), cooc_reference(s.coords, s.stride, z.numpy(), op), rtol=0, atol=1e-12)
    # a lone patch (no tissue neighbour) really occurs in some of these grids and gets 0
    lone = (neighbour_index(s) < 0).all(1)
    assert torch.all(got[lone] == 0)


def test_neighbour_cooc_finds_a_planted_pair():
    """An "A" value next to a "B" value lights up channel (A, B) at the A cell and (B, A) at the B cell."""
    s = random_slide(7, dim=2, shape=(6, 6), fill=1.0)
    z = torch.zeros(s.num_patches, 2, dtype=torch.float64)
    at = {(int(r), int(c)): i for i, (r, c) in enumerate(zip(s.rows, s.cols))}
    ia, ib = at[(2, 3)], at[(2, 4)]
    z[ia, 0], z[ib, 1] = 3.0, 3.0
    got = neighbour_cooc(s, z, "min")
    assert got[ia, 0 * 2 + 1] == 3.0 and got[ib, 1 * 2 + 0] == 3.0
    mask = torch.ones_like(got, dtype=torch.bool)
    mask[ia, 1], mask[ib, 2] = False, False
    assert torch.all(got[mask] <= 0.0)


def test_neighbour_cooc_is_invariant_under_rotations_and_flips():
    s = random_slide(11, dim=2)
    z = torch.randn(s.num_patches, 2, dtype=torch.float64)
    x, y = s.coords[:, 0], s.coords[:, 1]
    for coords in (np.stack([y, -x], 1), np.stack([-x, y], 1), np.stack([y, x], 1)):
        t = SlideGrid.from_coords("t", s.features, coords - coords.min(0), s.stride)
        torch.testing.assert_close(neighbour_cooc(t, z, "min"), neighbour_cooc(s, z, "min"))


def test_neighbour_cooc_fails_loudly_on_bad_input():
    s = random_slide(3)
    z = torch.randn(s.num_patches, 2)
    with pytest.raises(ValueError, match="op:"):
        neighbour_cooc(s, z, "max")
    with pytest.raises(ValueError, match="z:"):
        neighbour_cooc(s, z[:-1], "min")  # one patch short
    with pytest.raises(ValueError, match="z:"):
        neighbour_cooc(s, z[:, 0], "min")  # 1-D
    with pytest.raises(ValueError, match="z:"):
        neighbour_cooc(s, z[:, :0], "min")  # no channels
    bad = z.clone()
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="z:"):
        neighbour_cooc(s, bad, "min")


@pytest.mark.parametrize("value", ["max", 1, 0, "", None, 2.0])
def test_input_cooc_bad_value_names_the_argument(value):
    with pytest.raises(ValueError, match="input_cooc"):
        TwoDMambaMIL(6, 2, dim=8, d_inner=16, input_cooc=value)


@pytest.mark.parametrize("op", [True, "min", "prod"])
def test_input_cooc_forward_equals_the_model_fed_the_cooc_features(op):
    """With input_ica and input_cooc, the model gives what the same weights give on the features
    [z, reference co-occurrences of z] (z = the ICA components), slide by slide in a two-slide bag."""
    torch.manual_seed(0)
    model = TwoDMambaMIL(6, 2, dim=8, d_inner=16, d_state=4, input_ica=2, input_cooc=op).double().eval()
    model.fit_input_transform(torch.randn(500, 6, dtype=torch.float64), seed=1)
    plain = TwoDMambaMIL(2 + 4, 2, dim=8, d_inner=16, d_state=4).double().eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("ica_")})
    slides = [random_slide(20, dim=6), random_slide(21, dim=6, shape=(4, 9))]
    fed = []
    for s in slides:
        z = ((s.features - model.ica_mean) @ model.ica_unmix).numpy()
        ref = cooc_reference(s.coords, s.stride, z, "prod" if op == "prod" else "min")
        fed.append(SlideGrid.from_coords(s.slide_id, torch.from_numpy(np.concatenate([z, ref], 1)), s.coords, s.stride))
    out, want = model(Bag("a", slides)), plain(Bag("a", fed))
    torch.testing.assert_close(out.logits, want.logits)
    torch.testing.assert_close(out.scores, want.scores)


def test_input_cooc_without_ica_uses_the_raw_features_and_trains():
    torch.manual_seed(1)
    model = TwoDMambaMIL(3, 2, dim=8, d_inner=16, d_state=4, input_cooc="min")
    assert model.embed[0].in_features == 3 + 9
    bag = Bag("b", [random_slide(30, dim=3)])
    bag = Bag("b", [SlideGrid.from_coords("f", bag.slides[0].features.float(), bag.slides[0].coords, 256)])
    loss = torch.nn.functional.cross_entropy(model(bag).logits, torch.tensor([1]))
    loss.backward()
    assert model.embed[0].weight.grad is not None and torch.isfinite(model.embed[0].weight.grad).all()
    assert model.embed[0].weight.grad[:, 3:].abs().sum() > 0  # the co-occurrence channels reach the loss
