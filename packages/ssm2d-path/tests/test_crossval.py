"""Cross-validation on the CPU: two tiny folds, the aggregated table, the manifest, skip on re-run,
resume from a checkpoint, a failing fold reported while the other finishes."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from ssm2d_path.bag import Bag, SlideGrid
from ssm2d_path.config import parse_config
from ssm2d_path.crossval import crossval
from ssm2d_path.data import Example, Split
from ssm2d_path.models.base import MILModel, MILOutput
from ssm2d_path.tasks import ClassificationTask


class TinyMIL(MILModel):
    def __init__(self, in_dim, n_outputs, hidden=8):
        super().__init__()
        self.in_dim, self.n_outputs = in_dim, n_outputs
        self.fc = nn.Linear(in_dim, hidden)
        self.att = nn.Linear(hidden, 1)
        self.head = nn.Linear(hidden, n_outputs)
        self.scan_backend = None

    def forward(self, bag):
        h = torch.relu(self.fc(bag.features))
        a = self.att(h).squeeze(-1)
        return MILOutput(self.head((torch.softmax(a, 0)[:, None] * h).sum(0, keepdim=True)), a)


def tiny_factory(name, in_dim, n_outputs, **kw):
    return TinyMIL(in_dim, n_outputs, **kw)


class MemDataset:
    def __init__(self, n, broken=()):
        rng = np.random.default_rng(0)
        self.items = {}
        self.broken = set(broken)
        for i in range(n):
            coords = np.array([[0, 0], [256, 0], [0, 256], [512, 256]])
            f = rng.normal(size=(4, 5)).astype(np.float32)
            f[:, 1] += 2.0 * (i % 2)
            self.items[f"s{i}"] = Example(Bag(f"s{i}", [SlideGrid.from_coords(f"s{i}", torch.from_numpy(f), coords, 256)]),
                                     label=i % 2)
        self.ids = list(self.items)
        self.feature_dim = 5
        self.files = {}

    def __getitem__(self, key):
        if key in self.broken:
            raise RuntimeError(f"cannot read {key}")
        return self.items[key]


def _splits(ids):
    return [Split(ids[0:6], ids[6:8], ids[8:12]), Split(ids[4:10], ids[10:12], ids[0:4])]


def _cfg(tmp_path):
    return parse_config({"model": {"name": "tiny", "hidden": 4},
                         "train": {"epochs": 2, "lr": 1e-2, "progress": False, "device": "cpu"},
                         "output": {"dir": str(tmp_path / "cv")}}, check_model=False)


def test_crossval_two_folds_table_manifest_and_skip(tmp_path):
    ds = MemDataset(12)
    cfg = _cfg(tmp_path)
    res = crossval(cfg, dataset=ds, splits=_splits(ds.ids), task=ClassificationTask(2), model_factory=tiny_factory)
    assert res.ok and [r["fold"] for r in res.rows] == [0, 1]
    out = tmp_path / "cv"
    for f in (0, 1):
        r = json.loads((out / f"fold_{f}" / "results.json").read_text())
        assert r["n_train"] == 6 and r["n_test"] == 4
        assert res.rows[f]["test_auc"] == r["test"]["auc"]
        m = json.loads((out / f"fold_{f}" / "manifest.json").read_text())
        assert m["fold"] == f and m["config"]["model"] == {"name": "tiny", "hidden": 4}
        assert m["reported_epoch"] == r["reported_epoch"]
    summary = pd.read_csv(out / "results.csv")
    vals = [res.rows[0]["test_auc"], res.rows[1]["test_auc"]]
    assert summary["test_auc_mean"][0] == pytest.approx(np.mean(vals))
    assert summary["test_auc_std"][0] == pytest.approx(np.std(vals, ddof=1), nan_ok=True)
    assert "test_auc" in (out / "results.md").read_text()
    top = json.loads((out / "manifest.json").read_text())
    assert top["folds"] == [0, 1] and top["failed_folds"] == [] and top["packages"]["ssm2d-path"]
    assert top["seeds"] == {"train": 0, "splits": 0} and top["device"]["device"] == "cpu"

    # Re-run: finished folds are skipped (their files are not rewritten).
    stamp = (out / "fold_0" / "model.pt").stat().st_mtime_ns
    again = crossval(cfg, dataset=ds, splits=_splits(ds.ids), task=ClassificationTask(2),
                     model_factory=tiny_factory)
    assert (out / "fold_0" / "model.pt").stat().st_mtime_ns == stamp
    assert again.rows == res.rows


def test_failed_fold_is_reported_and_the_other_runs(tmp_path):
    ds = MemDataset(12, broken={"s1"})  # s1 is in fold 1 only
    splits = [Split(ds.ids[2:8], ds.ids[8:10], ds.ids[10:12]), Split(ds.ids[2:8], ds.ids[8:10], ds.ids[0:2])]
    res = crossval(_cfg(tmp_path), dataset=ds, splits=splits, task=ClassificationTask(2), model_factory=tiny_factory)
    assert not res.ok and list(res.failures) == [1]
    assert "cannot read s1" in res.failures[1]
    assert "cannot read s1" in (tmp_path / "cv" / "fold_1" / "error.txt").read_text()
    assert [r["fold"] for r in res.rows] == [0]
    assert json.loads((tmp_path / "cv" / "manifest.json").read_text())["failed_folds"] == [1]


def test_fold_with_checkpoint_resumes(tmp_path):
    ds = MemDataset(12)
    cfg = _cfg(tmp_path)

    class Stop(Exception):
        pass

    def stop(trainer, epoch, record):
        raise Stop

    res = crossval(cfg, dataset=ds, splits=_splits(ds.ids)[:1], task=ClassificationTask(2),
                   model_factory=tiny_factory, callbacks=[stop])
    assert "Stop" in res.failures[0]
    assert (tmp_path / "cv" / "fold_0" / "last.pt").is_file()
    res = crossval(cfg, dataset=ds, splits=_splits(ds.ids)[:1], task=ClassificationTask(2),
                   model_factory=tiny_factory)
    assert res.ok
    hist = json.loads((tmp_path / "cv" / "fold_0" / "results.json").read_text())["history"]
    assert [h["epoch"] for h in hist] == [1, 2]
