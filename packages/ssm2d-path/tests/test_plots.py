"""Figures of a run: ROC points against a brute-force threshold sweep, AUC against metrics.binary_auc, the
per-fold median split of the KM groups, the written PNGs, the plot command on a demo run, and the model
cards the demo's cross-validation writes (rebuilt models reproduce the saved predictions)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from ssm2d_path.bag import Bag
from ssm2d_path.cli import main
from ssm2d_path.io import read_slide
from ssm2d_path.metrics import binary_auc
from ssm2d_path.models.saved import load_trained_model
from ssm2d_path.plots import (load_run_predictions, plot_km_groups, plot_roc, plot_run, roc_curve,
                              split_by_fold_median, trapezoid_auc)
from ssm2d_path.tasks import risk_from_logits


def _brute_force_roc(pos, score):
    """(fpr, tpr) at every threshold t in the scores (plus +inf): positive when score >= t."""
    pts = {(0.0, 0.0)}
    for t in np.unique(score):
        pred = score >= t
        pts.add((float((pred & ~pos).sum() / (~pos).sum()), float((pred & pos).sum() / pos.sum())))
    return sorted(pts)


@pytest.mark.parametrize("ties", [False, True])
def test_roc_points_and_auc(ties):
    rng = np.random.default_rng(11 + ties)
    pos = rng.random(60) < 0.4
    score = rng.normal(size=60) + pos
    if ties:
        score = np.round(score * 2) / 2
    fpr, tpr, thr = roc_curve(pos, score)
    np.testing.assert_allclose(np.array(sorted(zip(fpr.tolist(), tpr.tolist()))),
                               np.array(_brute_force_roc(pos, score)), atol=1e-12)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert (fpr[-1], tpr[-1]) == (1.0, 1.0) and thr[0] == np.inf
    assert trapezoid_auc(fpr, tpr) == pytest.approx(binary_auc(pos, score), abs=1e-12)
    with pytest.raises(ValueError, match="both classes"):
        roc_curve(np.ones(4, bool), np.arange(4.0))


def _survival_df(rng, n_folds=3, n=24):
    rows = []
    for f in range(n_folds):
        risk = rng.normal(size=n) + 3 * f  # folds on different risk scales: a pooled median would be wrong
        t = rng.exponential(10 * np.exp(-(risk - 3 * f)))
        c = (rng.random(n) < 0.3).astype(int)
        rows += [{"fold": f, "bag_id": f"p{f}_{i}", "time": t[i], "censorship": c[i], "risk": risk[i]}
                 for i in range(n)]
    return pd.DataFrame(rows)


def _assert_figure(path, min_side=600):
    img = np.asarray(Image.open(path).convert("RGB"))
    assert min(img.shape[:2]) >= min_side
    assert img.std() > 5 and (img < 128).mean() > 0.005  # drawn, not blank


def test_km_groups_split_each_fold_at_its_median(tmp_path):
    df = _survival_df(np.random.default_rng(0))
    high = split_by_fold_median(df)
    for f in range(3):
        m = df["fold"].to_numpy() == f
        r = df["risk"].to_numpy()[m]
        np.testing.assert_array_equal(high[m], r > np.median(r))
        assert high[m].sum() == m.sum() // 2
    p = plot_km_groups(df, tmp_path / "km.png", title="test")
    _assert_figure(p)
    with pytest.raises(ValueError, match="risk"):
        plot_km_groups(df.drop(columns="risk"), tmp_path / "x.png")


def test_roc_figure_binary_and_multiclass(tmp_path):
    rng = np.random.default_rng(3)
    for c in (2, 4):
        y = rng.integers(0, c, 90)
        logits = rng.normal(size=(90, c)) + np.eye(c)[y] * 1.5
        p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        df = pd.DataFrame({"fold": np.repeat([0, 1, 2], 30), "label": y, **{f"prob_{k}": p[:, k] for k in range(c)}})
        _assert_figure(plot_roc(df, tmp_path / f"roc{c}.png", classes=[f"c{k}" for k in range(c)]))
    with pytest.raises(ValueError, match="classes"):
        plot_roc(df, tmp_path / "bad.png", classes=["a"])


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from ssm2d_path.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    res = run_demo(out, quick=True, device="cpu", progress=False, models=("2dmambamil", "abmil"))
    assert not res["failures"]
    return out


def test_plot_command_on_demo_runs(demo, tmp_path, capsys):
    rc = main(["plot", "--run", str(demo / "classification" / "2dmambamil"), "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0 and str(tmp_path / "roc.png") in out
    _assert_figure(tmp_path / "roc.png")
    paths = plot_run(demo / "survival")  # a folder of runs: one figure per model
    assert sorted(p.name for p in paths) == ["2dmambamil_km_risk_groups.png", "abmil_km_risk_groups.png"]
    for p in paths:
        _assert_figure(p)
    df = load_run_predictions(demo / "survival" / "abmil")
    assert sorted(df["fold"].unique()) == [0, 1, 2]
    assert main(["plot", "--run", str(tmp_path / "nothing")]) == 2


@pytest.mark.parametrize("cohort", ["classification", "survival"])
def test_demo_model_cards_rebuild_the_models(demo, cohort):
    """A fold's model.json + model.pt give back the model that wrote predictions_test.csv."""
    fold = demo / cohort / "2dmambamil" / "fold_1"
    model, card = load_trained_model(fold / "model.pt")
    assert card["name"] == "2dmambamil" and card["in_dim"] == 16 and card["encoder"] == "synthetic"
    assert card["task"] == cohort
    pred = pd.read_csv(fold / "predictions_test.csv")
    feats = demo / "data" / cohort / "20x_256px_0px_overlap" / "features_synthetic"
    for _, row in pred.head(3).iterrows():
        bag = Bag(row["bag_id"], [read_slide(feats / f"{row['bag_id']}.h5")])
        with torch.no_grad():
            lg = model(bag).logits.double()
        if cohort == "classification":
            assert card["classes"] == ["0", "1"]
            np.testing.assert_allclose(torch.softmax(lg, 1)[0, 1].item(), row["prob_1"], rtol=1e-5)
        else:
            assert card["loss"] == "nll" and card["n_bins"] == 4 and len(card["edges"]) == 5
            np.testing.assert_allclose(risk_from_logits(lg)[0].item(), row["risk"], rtol=1e-5)
