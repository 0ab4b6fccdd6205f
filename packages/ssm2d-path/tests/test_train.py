"""Trainer: exact resume, model selection, predictions files, the Cox window, checkpoints loadable with
weights_only=True. Tiny in-memory bags and a tiny attention MIL model keep it fast."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from ssm2d_path.bag import Bag, SlideGrid
from ssm2d_path.config import TrainConfig
from ssm2d_path.data import Example
from ssm2d_path.models.base import MILModel, MILOutput
from ssm2d_path.tasks import ClassificationTask, SurvivalTask, survival_bins
from ssm2d_path.train import Trainer, epoch_order, load_checkpoint, rng_state, set_rng_state


class TinyMIL(MILModel):
    """Linear + dropout + attention pooling (dropout makes resume depend on the saved RNG state)."""

    def __init__(self, in_dim, n_outputs, hidden=8, dropout=0.3):
        super().__init__()
        self.in_dim, self.n_outputs = in_dim, n_outputs
        self.fc = nn.Linear(in_dim, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.drop = nn.Dropout(dropout)
        self.att = nn.Linear(hidden, 1)
        self.head = nn.Linear(hidden, n_outputs)
        self.scan_backend = None

    def forward(self, bag):
        h = self.drop(torch.relu(self.norm(self.fc(bag.features))))
        a = self.att(h).squeeze(-1)
        w = torch.softmax(a, 0)
        return MILOutput(self.head((w[:, None] * h).sum(0, keepdim=True)), a)


def make_examples(n, seed=0, dim=6, survival=False):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        y = i % 2
        k = int(rng.integers(3, 9))
        coords = np.stack(np.meshgrid(np.arange(k) * 256, np.arange(2) * 256), -1).reshape(-1, 2)
        f = rng.normal(size=(len(coords), dim)).astype(np.float32)
        f[:, 0] += 1.5 * y
        bag = Bag(f"b{i}", [SlideGrid.from_coords(f"b{i}", torch.from_numpy(f), coords, 256)])
        if survival:
            t = float(rng.exponential(10.0 / (1 + 2 * y)))
            out.append(Example(bag, time=t, censorship=int(rng.random() < 0.3)))
        else:
            out.append(Example(bag, label=y))
    return out


def _cfg(**kw):
    base = dict(epochs=3, lr=5e-3, accumulation=2, warmup_epochs=0.5, progress=False, seed=5)
    base.update(kw)
    return TrainConfig(**base)


class Stop(Exception):
    pass


def test_resume_after_interruption_is_bitwise_identical(tmp_path):
    data = make_examples(14)
    tr, va, te = data[:8], data[8:11], data[11:]
    task = ClassificationTask(2)

    torch.manual_seed(0)
    ref = Trainer(TinyMIL(6, 2), task, tr, va, te, cfg=_cfg(), out_dir=tmp_path / "a", selection="val_loss").fit()

    def stop_after_1(trainer, epoch, record):
        if epoch == 1:
            raise Stop

    torch.manual_seed(0)
    with pytest.raises(Stop):
        Trainer(TinyMIL(6, 2), task, tr, va, te, cfg=_cfg(), out_dir=tmp_path / "b", selection="val_loss",
                callbacks=[stop_after_1]).fit()
    assert load_checkpoint(tmp_path / "b" / "last.pt")["epoch"] == 1
    assert not (tmp_path / "b" / "results.json").exists()
    # Different initial weights and a disturbed global RNG: everything must come from the checkpoint.
    torch.manual_seed(99)
    torch.rand(5)
    res = Trainer(TinyMIL(6, 2), task, tr, va, te, cfg=_cfg(), out_dir=tmp_path / "b", selection="val_loss").fit()

    a = torch.load(tmp_path / "a" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = load_checkpoint(tmp_path / "a" / "last.pt")["model"]
    lb = load_checkpoint(tmp_path / "b" / "last.pt")["model"]
    assert all(torch.equal(la[k], lb[k]) for k in la)
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(res["history"]) == strip(ref["history"])
    assert res["test"] == ref["test"] and res["val"] == ref["val"] and res["reported_epoch"] == ref["reported_epoch"]


def test_selection_predictions_and_results(tmp_path):
    data = make_examples(16, seed=1)
    tr, va, te = data[:8], data[8:12], data[12:]
    torch.manual_seed(1)
    res = Trainer(TinyMIL(6, 2), ClassificationTask(2), tr, va, te, cfg=_cfg(epochs=4, accumulation=1),
                  out_dir=tmp_path, selection="val_auc").fit()
    aucs = [r["val_auc"] for r in res["history"]]
    assert res["reported_epoch"] == int(np.argmax(aucs)) + 1  # the first best epoch
    assert res["val"]["auc"] == pytest.approx(aucs[res["reported_epoch"] - 1])
    pred = pd.read_csv(tmp_path / "predictions_test.csv")
    assert list(pred.columns) == ["bag_id", "label", "prob_0", "prob_1", "pred"]
    assert list(pred.bag_id) == [e.bag.bag_id for e in te]
    np.testing.assert_allclose(pred.prob_0 + pred.prob_1, 1.0, rtol=1e-9)
    assert json.loads((tmp_path / "results.json").read_text())["test"]["acc"] == pytest.approx(
        float((pred.pred == pred.label).mean()))
    # lr schedule: warm-up then cosine to 0 over 4 epochs of 8 steps.
    assert res["history"][-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    # A finished run is not retrained: fit() again only re-evaluates the stored selection.
    again = Trainer(TinyMIL(6, 2), ClassificationTask(2), tr, va, te, cfg=_cfg(epochs=4, accumulation=1),
                    out_dir=tmp_path, selection="val_auc").fit()
    assert again["test"] == res["test"]


def test_survival_nll_and_cox_train_and_write_risk(tmp_path):
    data = make_examples(16, seed=2, survival=True)
    t = [e.time for e in data]
    c = [e.censorship for e in data]
    edges = survival_bins(t, c, 4)
    for loss in ("nll", "cox"):
        task = SurvivalTask(edges, loss=loss)
        torch.manual_seed(0)
        res = Trainer(TinyMIL(6, task.n_outputs), task, data[:10], data[10:13], data[13:],
                      cfg=_cfg(epochs=2, accumulation=4), out_dir=tmp_path / loss, selection="val_cindex").fit()
        pred = pd.read_csv(tmp_path / loss / "predictions_test.csv")
        assert {"bag_id", "time", "censorship", "risk"} <= set(pred.columns)
        assert ("surv_3" in pred.columns) == (loss == "nll")
        assert np.isfinite(res["history"][-1]["train_loss"])
    with pytest.raises(ValueError, match="accumulation"):
        Trainer(TinyMIL(6, 1), SurvivalTask(edges, loss="cox"), data, cfg=_cfg(accumulation=1),
                out_dir=tmp_path / "x", selection="last")


def test_selection_needs_val_and_data_order_depends_on_seed_and_epoch(tmp_path):
    data = make_examples(4)
    with pytest.raises(ValueError, match="validation split"):
        Trainer(TinyMIL(6, 2), ClassificationTask(2), data, [], cfg=_cfg(), out_dir=tmp_path, selection="val_auc")
    assert epoch_order(20, 1, 0) == epoch_order(20, 1, 0)
    assert epoch_order(20, 1, 0) != epoch_order(20, 1, 1) and sorted(epoch_order(20, 1, 3)) == list(range(20))


def test_rng_state_round_trip_through_weights_only_load(tmp_path):
    import random

    torch.manual_seed(3); np.random.seed(3); random.seed(3)
    np.random.normal()  # leaves a cached gaussian
    torch.save(rng_state(), tmp_path / "r.pt")
    ref = (torch.rand(3), np.random.normal(size=3), random.random(), random.gauss(0, 1))
    set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True))
    got = (torch.rand(3), np.random.normal(size=3), random.random(), random.gauss(0, 1))
    assert torch.equal(ref[0], got[0]) and np.array_equal(ref[1], got[1]) and ref[2:] == got[2:]
