"""benchmarks/mil_cohorts.py writes the cohort its spec describes; benchmarks/bench_mil_sweep.py runs the CLI
and tabulates what the runs wrote."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_mil_sweep as sweep  # noqa: E402
import mil_cohorts as mc  # noqa: E402

SMALL = mc.CohortSpec(slides=12, motifs=3, adjacent=2, noise=0.2, dim=8, patches=(120, 200), seed=3)


def _grid(truth: dict, shape) -> np.ndarray:
    kind = np.zeros(shape, np.int8)
    for r, c in truth["A"]:
        kind[r, c] = 1
    for r, c in truth["B"]:
        kind[r, c] = 2
    return kind


@pytest.mark.parametrize("orientation", mc.ORIENTATIONS)
def test_cohort_matches_its_spec(tmp_path, orientation):
    from ssm2d_path.data import LabelTable
    from ssm2d_path.io import read_slide

    spec = replace(SMALL, orientation=orientation)
    res = mc.generate(tmp_path, spec)
    table = LabelTable.read(res["labels"], task="classification")
    labels = [t["label"] for t in res["truth"].values()]
    assert sorted(labels) == [0] * 6 + [1] * 6 and len(table.classes) == 2
    meta = json.loads((tmp_path / "cohort.json").read_text())
    dirs = np.asarray(meta["directions"])
    gram = dirs @ dirs.T
    assert np.allclose(np.diag(gram), [1.0, 9.0, 9.0]) and np.allclose(gram - np.diag(np.diag(gram)), 0, atol=1e-9)
    strides = set()
    for sid, truth in res["truth"].items():
        g = read_slide(res["features"] / f"{sid}.h5")
        strides.add(g.stride)
        assert g.num_patches == truth["n_patches"] and g.features.shape[1] == spec.dim
        kind = _grid(truth, g.shape)
        assert (kind == 1).sum() == spec.motifs and (kind == 2).sum() == spec.motifs
        # touching pairs: exactly `adjacent` in class 1, none in class 0, on the sides the orientation allows
        a, b = kind == 1, kind == 2
        vertical = int(np.sum(a[:-1] & b[1:]))
        up = int(np.sum(b[:-1] & a[1:]))
        horizontal = int(np.sum(a[:, :-1] & b[:, 1:]))
        left = int(np.sum(b[:, :-1] & a[:, 1:]))
        total = vertical + up + horizontal + left
        assert total == mc.adjacent_pairs(kind) == (spec.adjacent if truth["label"] else 0)
        if orientation == "vertical":
            assert total == vertical
        if orientation == "horizontal":
            assert total == horizontal
        # features sit around their type's direction
        types = kind[g.rows, g.cols]
        x = g.features.double().numpy()
        for t in (1, 2):
            err = x[types == t] - dirs[t]
            assert np.abs(err.mean(0)).max() < 4 * spec.noise
    assert strides == {256, 512}


def test_bad_spec_names_the_argument(tmp_path):
    for kw, name in (({"adjacent": 6}, "adjacent"), ({"orientation": "diagonal"}, "orientation"),
                     ({"noise": -1.0}, "noise"), ({"dim": 2}, "dim"), ({"patches": (10, 20)}, "patches"),
                     ({"slides": 2}, "slides")):
        with pytest.raises(ValueError, match=rf"^{name}:"):
            mc.generate(tmp_path, replace(SMALL, **kw))


def test_pair_statistic_against_brute_force():
    rng = np.random.default_rng(0)
    za, zb = rng.normal(size=(6, 7)), rng.normal(size=(6, 7))
    za[0, 0] = zb[5, 6] = np.nan  # no tissue there
    pairs = []
    for r in range(6):
        for c in range(7):
            for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                rr, cc = r + dr, c + dc
                if 0 <= rr < 6 and 0 <= cc < 7 and np.isfinite(za[r, c]) and np.isfinite(zb[rr, cc]):
                    pairs.append(min(za[r, c], zb[rr, cc]))
    for k in (1, 3):
        assert mc.pair_statistic(za, zb, k) == pytest.approx(sum(sorted(pairs)[-k:]))
    with pytest.raises(ValueError, match="k: need >= 1"):
        mc.pair_statistic(za, zb, 0)


def test_oracle_separates_an_easy_cohort(tmp_path):
    from ssm2d_path.metrics import binary_auc

    res = mc.generate(tmp_path, replace(SMALL, slides=20, noise=0.3))
    meta = json.loads((tmp_path / "cohort.json").read_text())
    scores = mc.oracle_scores(res["features"], np.asarray(meta["directions"]), 0.3, k=2)
    ids = sorted(scores)
    auc = binary_auc(np.array([res["truth"][i]["label"] for i in ids]), np.array([scores[i] for i in ids]))
    assert auc == 1.0


def test_loss_curves_average_over_the_folds_that_ran():
    folds = [{"history": [{"train_loss": 1.0, "val_loss": 2.0}, {"train_loss": 0.5, "val_loss": 1.0}]},
             {"history": [{"train_loss": 3.0, "val_loss": 4.0}]}]
    c = sweep.loss_curves(folds)
    assert c == {"epoch": [1, 2], "train": [2.0, 0.5], "val": [3.0, 1.0]}


def test_sweep_through_the_cli(tmp_path):
    out = tmp_path / "out"
    sweep.LEVELS["tiny"] = replace(SMALL, slides=10)
    try:
        summary = sweep.run_sweep(out, tmp_path / "work", ["tiny"], ["2dmambamil", "abmil"], k=2,
                                  overrides=["train.epochs=2", "train.min_epochs=1"])
        table_md = (out / "table.md").read_text()
        # tabulating again trains nothing and gives the same table; a model never run is left out
        again = sweep.run_sweep(tmp_path / "again", tmp_path / "work", ["tiny"], ["2dmambamil", "abmil", "transmil"],
                                k=2, overrides=["train.epochs=2", "train.min_epochs=1"], train=False)
    finally:
        del sweep.LEVELS["tiny"]
    assert not (tmp_path / "work" / "tiny" / "runs" / "transmil").exists() and "transmil" not in again["tiny"]["models"]
    assert again["tiny"]["models"]["abmil"]["test_auc"] == summary["tiny"]["models"]["abmil"]["test_auc"]
    assert (tmp_path / "again" / "table.md").read_text().replace("| - |", "|").count("±") == table_md.count("±")
    entry = summary["tiny"]
    assert len(entry["oracle"]) == 2
    for m in ("2dmambamil", "abmil"):
        r = entry["models"][m]
        assert len(r["test_auc"]) == 2 and all(0.0 <= a <= 1.0 for a in r["test_auc"])
        assert r["recipe"] == "default" and r["run_config"]["epochs"] == 2
    att = entry["models"]["2dmambamil"]["attention"]
    assert att["slides_with_pairs"] >= 1 and 0.0 <= att["pair_rank"] <= 1.0
    table = (out / "table.md").read_text()
    assert "| tiny |" in table and "2 of 3 adjacent" in table
    assert (out / "curves_tiny.png").stat().st_size > 0


def test_sweep_runs_and_tabulates_only_the_folds_asked_for(tmp_path):
    out = tmp_path / "out"
    sweep.LEVELS["tiny"] = replace(SMALL, slides=12)
    try:
        with pytest.raises(ValueError, match="^folds:"):
            sweep.run_sweep(out, tmp_path / "work", ["tiny"], ["abmil"], k=3, folds=[3])
        summary = sweep.run_sweep(out, tmp_path / "work", ["tiny"], ["abmil"], k=3, folds=[1],
                                  overrides=["train.epochs=2", "train.min_epochs=1"])
        full_oracle = sweep.oracle_by_fold(tmp_path / "work" / "tiny" / "cohort", tmp_path / "work" / "tiny" / "splits", 3)
    finally:
        del sweep.LEVELS["tiny"]
    runs = tmp_path / "work" / "tiny" / "runs" / "abmil"
    assert sorted(p.name for p in runs.glob("fold_*")) == ["fold_1"]
    entry = summary["tiny"]
    assert entry["oracle"] == [full_oracle[1]] and len(full_oracle) == 3
    assert len(entry["models"]["abmil"]["test_auc"]) == 1
    table = (out / "table.md").read_text()
    assert "over folds [1] of 3" in table and "(1 of" not in table
    assert json.loads((out / "sweep.json").read_text())["folds"] == [1]
