"""ICA of patch features (ssm2d_path.models.ica) and 2DMambaMIL's input_ica option."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssm2d_path.bag import Bag, SlideGrid
from ssm2d_path.config import TrainConfig
from ssm2d_path.data import Example
from ssm2d_path.models import TwoDMambaMIL
from ssm2d_path.models.ica import fit_ica, subsample_rows
from ssm2d_path.tasks import ClassificationTask
from ssm2d_path.train import Trainer


def _planted(seed, n=20000, dim=12, rate=0.01, size=4.0):
    """Gaussian features (a random covariance) with two rare spikes along two planted directions."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(dim, dim)) / np.sqrt(dim) + np.eye(dim)
    x = rng.normal(size=(n, dim)) @ mix.T + rng.normal(size=dim)
    dirs = np.linalg.qr(rng.normal(size=(dim, 2)))[0].T
    kinds = rng.choice(3, size=n, p=[1 - 2 * rate, rate, rate])
    x[kinds == 1] += size * dirs[0]
    x[kinds == 2] += size * dirs[1]
    return torch.from_numpy(x), dirs, kinds


def test_fit_ica_whitens_sorts_signs_and_finds_the_planted_components():
    x, dirs, kinds = _planted(0)
    mean, unmix, kurt = fit_ica(x, 4, seed=1)
    u = ((x - mean) @ unmix).numpy()
    np.testing.assert_allclose(mean.numpy(), x.numpy().mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.cov(u.T), np.eye(4), atol=1e-6)  # unit variance, uncorrelated
    k_ref = ((u - u.mean(0)) ** 4).mean(0) / u.var(0, ddof=1) ** 2 - 3  # unit variance as the whitening counts it
    np.testing.assert_allclose(kurt.numpy(), k_ref, atol=1e-6)
    assert np.all(np.diff(kurt.numpy()) <= 0)
    assert np.all(((u - u.mean(0)) ** 3).mean(0) >= 0)
    # the two heavy-tailed components are the planted spikes: high on their own patches
    top = {int(np.argmax([u[kinds == t, c].mean() for t in (1, 2)])) for c in (0, 1)}
    assert top == {0, 1}
    for c in (0, 1):
        t = 1 + int(np.argmax([u[kinds == t, c].mean() for t in (1, 2)]))
        assert u[kinds == t, c].mean() > 3 and abs(u[kinds == 0, c].mean()) < 0.2


def test_fit_ica_errors_name_the_argument():
    x = torch.randn(50, 6, dtype=torch.float64)
    for n in (0, 7, True, 2.0):
        with pytest.raises(ValueError, match="n:"):
            fit_ica(x, n)
    with pytest.raises(ValueError, match="x:"):
        fit_ica(torch.randn(5, 6), 2)
    with pytest.raises(ValueError, match="x:"):
        fit_ica(torch.randn(50), 2)
    bad = x.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="x:"):
        fit_ica(bad, 2)


def test_subsample_rows():
    x = torch.arange(40.0).reshape(20, 2)
    assert subsample_rows(x, None) is x and subsample_rows(x, 20) is x
    s = subsample_rows(x, 7, seed=3)
    assert s.shape == (7, 2) and len({tuple(r) for r in s.tolist()}) == 7
    assert all(r in x.tolist() for r in s.tolist())


def _slide(seed, dim=10):
    rng = np.random.default_rng(seed)
    rows, cols = np.nonzero(rng.random((5, 6)) < 0.7)
    coords = np.stack([cols * 256, rows * 256], 1)
    return SlideGrid.from_coords(f"s{seed}", torch.from_numpy(rng.normal(size=(len(rows), dim))), coords, 256)


def test_input_ica_forward_equals_the_model_fed_the_components():
    """A model with input_ica gives what the same weights without it give on (x - mean) @ unmix."""
    torch.manual_seed(0)
    model = TwoDMambaMIL(10, 2, dim=8, d_inner=16, d_state=4, input_ica=3).double().eval()
    x, _, _ = _planted(1, n=3000, dim=10)
    model.fit_input_transform(x, seed=2)
    mean, unmix, _ = fit_ica(x, 3, seed=2)
    torch.testing.assert_close(model.ica_unmix, unmix)
    assert bool(model.ica_fitted)
    plain = TwoDMambaMIL(3, 2, dim=8, d_inner=16, d_state=4).double().eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("ica_")})
    s = _slide(4)
    comp = SlideGrid.from_coords("c", (s.features - mean) @ unmix, s.coords, s.stride)
    out, ref = model(Bag("a", [s])), plain(Bag("a", [comp]))
    torch.testing.assert_close(out.logits, ref.logits)
    torch.testing.assert_close(out.scores, ref.scores)


def test_trainer_fits_the_input_transform_on_the_training_patches_only(tmp_path):
    train, val = [], []
    for i in range(8):
        s = _slide(10 + i)
        (train if i < 6 else val).append(Example(Bag(f"b{i}", [s]), label=i % 2))
    model = TwoDMambaMIL(10, 2, dim=8, d_inner=16, d_state=4, input_ica=2)
    assert model.needs_input_fit and not bool(model.ica_fitted)
    cfg = TrainConfig(epochs=1, lr=1e-3, progress=False, seed=3, dihedral=False, feature_noise=0.0, device="cpu")
    Trainer(model, ClassificationTask(2), train, val, cfg=cfg, out_dir=tmp_path, selection="val_loss").fit()
    assert bool(model.ica_fitted)
    feats = torch.cat([e.bag.features for e in train]).float()
    mean, unmix, _ = fit_ica(feats.double(), 2, seed=3)
    torch.testing.assert_close(model.ica_mean, mean.float())
    torch.testing.assert_close(model.ica_unmix, unmix.float())


@pytest.mark.parametrize("value", [-1, 11, True, 1.5])
def test_input_ica_out_of_range_names_the_argument(value):
    with pytest.raises(ValueError, match="input_ica"):
        TwoDMambaMIL(10, 2, dim=8, d_inner=16, input_ica=value)


def test_fit_input_transform_checks_the_features():
    model = TwoDMambaMIL(10, 2, dim=8, d_inner=16, input_ica=2)
    with pytest.raises(ValueError, match="features"):
        model.fit_input_transform(torch.randn(100, 9))
    plain = TwoDMambaMIL(10, 2, dim=8, d_inner=16)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    plain.fit_input_transform(torch.randn(100, 10))  # no transform: nothing changes
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())


def test_input_shrink_after_ica_equals_the_model_fed_the_shrunk_components():
    torch.manual_seed(1)
    model = TwoDMambaMIL(10, 2, dim=8, d_inner=16, d_state=4, input_ica=3, input_shrink=0.7).double().eval()
    x, _, _ = _planted(2, n=3000, dim=10)
    model.fit_input_transform(x, seed=0)
    mean, unmix, _ = fit_ica(x, 3, seed=0)
    plain = TwoDMambaMIL(3, 2, dim=8, d_inner=16, d_state=4).double().eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("ica_")})
    s = _slide(5)
    comp = ((s.features - mean) @ unmix).numpy()
    shrunk = torch.from_numpy(np.where(comp > 0.7, comp - 0.7, 0.0))
    out = model(Bag("a", [s]))
    ref = plain(Bag("a", [SlideGrid.from_coords("c", shrunk, s.coords, s.stride)]))
    torch.testing.assert_close(out.logits, ref.logits)
    # without ICA the raw features are shrunk
    raw = TwoDMambaMIL(10, 2, dim=8, d_inner=16, d_state=4, input_shrink=0.5).double().eval()
    same = TwoDMambaMIL(10, 2, dim=8, d_inner=16, d_state=4).double().eval()
    same.load_state_dict(raw.state_dict())
    f = s.features.numpy()
    ref = same(Bag("a", [SlideGrid.from_coords("c", torch.from_numpy(np.where(f > 0.5, f - 0.5, 0.0)), s.coords, s.stride)]))
    torch.testing.assert_close(raw(Bag("a", [s])).logits, ref.logits)


@pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf"), True, "1"])
def test_input_shrink_out_of_range_names_the_argument(value):
    with pytest.raises(ValueError, match="input_shrink"):
        TwoDMambaMIL(10, 2, dim=8, d_inner=16, input_shrink=value)


def test_fit_ica_restarts_keep_the_run_of_largest_summed_abs_kurtosis():
    """restarts=r returns what the best of the r single runs (seeds seed .. seed + r - 1, summed
    |kurtosis|) returns; restarts=1 is the single run."""
    x, _, _ = _planted(3, n=6000, dim=10)
    runs = [fit_ica(x, 5, seed=s, iters=30) for s in (4, 5, 6)]
    sums = [float(k.abs().sum()) for _, _, k in runs]
    want = runs[int(np.argmax(sums))]
    got = fit_ica(x, 5, seed=4, iters=30, restarts=3)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    for a, b in zip(fit_ica(x, 5, seed=4, iters=30, restarts=1), runs[0]):
        torch.testing.assert_close(a, b)
    assert float(got[2].abs().sum()) >= max(sums) - 1e-12


def test_fit_ica_restarts_and_the_model_option_name_the_argument():
    x = torch.randn(50, 6, dtype=torch.float64)
    for r in (0, True, 1.5):
        with pytest.raises(ValueError, match="restarts:"):
            fit_ica(x, 2, restarts=r)
    for r in (0, 2.0, True):
        with pytest.raises(ValueError, match="input_ica_restarts"):
            TwoDMambaMIL(6, 2, dim=8, d_inner=16, input_ica=2, input_ica_restarts=r)
    with pytest.raises(ValueError, match="input_ica_restarts"):
        TwoDMambaMIL(6, 2, dim=8, d_inner=16, input_ica_restarts=3)  # without input_ica


def test_model_input_ica_restarts_fits_the_best_restart():
    x, _, _ = _planted(4, n=4000, dim=6)
    model = TwoDMambaMIL(6, 2, dim=8, d_inner=16, input_ica=3, input_ica_restarts=4).double()
    model.fit_input_transform(x, seed=2)
    mean, unmix, _ = fit_ica(x, 3, seed=2, restarts=4)
    torch.testing.assert_close(model.ica_unmix, unmix)
    torch.testing.assert_close(model.ica_mean, mean)
