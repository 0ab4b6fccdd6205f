"""Runs never mix configurations or lose results: fingerprints per fold, refusal of another configuration
(naming the keys) unless --overwrite, resume of an identical one only (kill-and-resume), the table from
every finished fold on disk, split folders of one k, each patient tested exactly once.

A tiny real cohort (TRIDENT files of 3 x 3-cell slides, 4-d features) and ABMIL with 4 channels keep every
run to a second or two on the CPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _featfiles import write_trident  # noqa: E402
from ssm2d_path import cli
from ssm2d_path.config import parse_config
from ssm2d_path.crossval import crossval
from ssm2d_path.runstate import RunConflictError


def make_cohort(root, n=8, seed=0):
    """n slides (one per patient, half of each class) of 3 x 3 cells; labels.csv. Returns (features, labels)."""
    rng = np.random.default_rng(seed)
    feats = root / "features"
    rows = []
    for i in range(n):
        label = i % 2
        f = rng.normal(size=(9, 4)).astype(np.float32)
        f[:, 0] += 2.0 * label
        coords = np.array([(c * 256, r * 256) for r in range(3) for c in range(3)])
        write_trident(feats / f"s{i}.h5", f, coords, psl0=256)
        rows.append({"case_id": f"p{i}", "slide_id": f"s{i}", "label": label})
    labels = root / "labels.csv"
    pd.DataFrame(rows).to_csv(labels, index=False)
    return feats, labels


def raw_config(root, feats, labels, **train):
    return {"data": {"feature_dir": str(feats), "label_csv": str(labels), "k": 2, "val_fraction": 0.2},
            "model": {"name": "abmil", "dim": 4, "attn_dim": 4, "dropout": 0.0},
            "train": {"epochs": 2, "lr": 1e-2, "progress": False, "device": "cpu", **train},
            "output": {"dir": str(root / "run")}}


def write_yaml(path, raw) -> str:
    import yaml

    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.fixture()
def cohort(tmp_path):
    feats, labels = make_cohort(tmp_path)
    return tmp_path, feats, labels


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_rerun_with_another_config_is_refused_naming_the_keys_and_overwrite_redoes_it(cohort, capsys):
    root, feats, labels = cohort
    cfg = write_yaml(root / "c.yaml", raw_config(root, feats, labels))
    assert cli.main(["crossval", "--config", cfg]) == 0
    run = root / "run"
    table = (run / "results_folds.csv").read_text()
    manifest = json.loads((run / "manifest.json").read_text())
    for f in (0, 1):
        r = json.loads((run / f"fold_{f}" / "results.json").read_text())
        assert r["run_config"]["train"]["lr"] == 0.01 and len(r["fingerprint"]) == 16
        ckpt = _state(run / f"fold_{f}" / "last.pt")
        assert ckpt["fingerprint"] == r["fingerprint"] and ckpt["run_config"] == r["run_config"]
    assert manifest["run_config"]["train"]["lr"] == 0.01
    capsys.readouterr()

    # Another lr and dim into the same folder: refused up front, one line naming both keys, nothing touched.
    args = ["crossval", "--config", cfg, "--set", "train.lr=0.02", "--set", "model.dim=8"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "train.lr 0.01 -> 0.02" in err and "model.dim 4 -> 8" in err and "--overwrite" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert (run / "results_folds.csv").read_text() == table
    assert json.loads((run / "manifest.json").read_text()) == manifest

    # --overwrite: every fold starts afresh with the new settings; table and manifest follow them.
    assert cli.main(args + ["--overwrite"]) == 0
    out = capsys.readouterr().out
    assert "fold 0: made with another configuration" in out and "overwritten, started afresh" in out
    for f in (0, 1):
        r = json.loads((run / f"fold_{f}" / "results.json").read_text())
        assert r["run_config"]["train"]["lr"] == 0.02 and r["run_config"]["model"]["dim"] == 8
        assert _state(run / f"fold_{f}" / "model.pt")["embed.0.weight"].shape[0] == 8
    m = json.loads((run / "manifest.json").read_text())
    assert m["config"]["train"]["lr"] == 0.02 and m["folds"] == [0, 1] and m["overwrite"] is True
    rows = pd.read_csv(run / "results_folds.csv")
    for f in (0, 1):
        r = json.loads((run / f"fold_{f}" / "results.json").read_text())
        assert rows.set_index("fold").loc[f, "test_auc"] == pytest.approx(r["test"]["auc"], nan_ok=True)


def test_same_config_rerun_skips_and_says_so(cohort, capsys):
    root, feats, labels = cohort
    cfg = write_yaml(root / "c.yaml", raw_config(root, feats, labels))
    assert cli.main(["crossval", "--config", cfg]) == 0
    stamp = (root / "run" / "fold_0" / "model.pt").stat().st_mtime_ns
    capsys.readouterr()
    # device and progress do not change results: not part of the fingerprint.
    assert cli.main(["crossval", "--config", cfg, "--set", "train.progress=true"]) == 0
    assert "folds 0, 1: finished with this configuration, skipped" in capsys.readouterr().out
    assert (root / "run" / "fold_0" / "model.pt").stat().st_mtime_ns == stamp


def test_kill_and_resume_continues_only_the_same_configuration(cohort, capsys):
    root, feats, labels = cohort
    raw = raw_config(root, feats, labels, epochs=3)

    class Killed(Exception):
        pass

    def kill_after_first_epoch(trainer, epoch, record):
        if epoch == 1:
            raise Killed

    # Uninterrupted reference in another folder.
    ref = parse_config({**raw, "output": {"dir": str(root / "ref")}})
    assert crossval(ref, folds=[0]).ok

    cfg = parse_config(raw)
    res = crossval(cfg, folds=[0], callbacks=[kill_after_first_epoch])
    assert "Killed" in res.failures[0]
    ckpt = root / "run" / "fold_0" / "last.pt"
    assert _state(ckpt)["epoch"] == 1
    capsys.readouterr()

    # Resuming with another lr (or epochs) would mix two configurations in one fold: refused.
    for key, value, text in (("lr", 5e-3, "train.lr 0.01 -> 0.005"), ("epochs", 4, "train.epochs 3 -> 4")):
        changed = parse_config(raw_config(root, feats, labels, **{"epochs": 3, key: value}))
        with pytest.raises(RunConflictError, match="fold 0") as exc:
            crossval(changed, folds=[0])
        assert text in str(exc.value)
        assert _state(ckpt)["epoch"] == 1 and not (root / "run" / "fold_0" / "results.json").exists()

    # The same configuration resumes after epoch 1, says so, and ends bitwise where the uninterrupted run did.
    res = crossval(cfg, folds=[0])
    assert res.ok and "fold 0: resumed after epoch 1" in capsys.readouterr().out
    hist = json.loads((root / "run" / "fold_0" / "results.json").read_text())["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    a, b = _state(root / "run" / "fold_0" / "model.pt"), _state(root / "ref" / "fold_0" / "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_trainer_refuses_a_checkpoint_of_another_configuration(tmp_path):
    from ssm2d_path.config import TrainConfig
    from ssm2d_path.train import Trainer
    from test_crossval import MemDataset, TinyMIL
    from ssm2d_path.tasks import ClassificationTask

    ds = MemDataset(8)
    data = [ds.items[i] for i in ds.ids]

    def trainer(lr, epochs):
        torch.manual_seed(0)
        return Trainer(TinyMIL(5, 2), ClassificationTask(2), data[:6], data[6:], None,
                       cfg=TrainConfig(epochs=epochs, lr=lr, progress=False, device="cpu"), out_dir=tmp_path,
                       selection="last")

    class Stop(Exception):
        pass

    def stop(trainer, epoch, record):
        raise Stop

    t = trainer(1e-2, 3)
    t.callbacks = [stop]
    with pytest.raises(Stop):
        t.fit()
    with pytest.raises(RunConflictError, match=r"train\.lr 0\.01 -> 0\.02"):
        trainer(2e-2, 3).fit()
    assert trainer(1e-2, 3).fit()["reported_epoch"] == 3


def test_one_fold_on_a_finished_run_keeps_every_fold_in_the_table(cohort, capsys):
    root, feats, labels = cohort
    raw = raw_config(root, feats, labels)
    raw["data"]["k"] = 3
    cfg = write_yaml(root / "c.yaml", raw)
    assert cli.main(["crossval", "--config", cfg]) == 0
    run = root / "run"
    before = pd.read_csv(run / "results_folds.csv")
    assert list(before["fold"]) == [0, 1, 2]
    summary = (run / "results.csv").read_text()
    for args in (["train", "--config", cfg, "--fold", "1"], ["crossval", "--config", cfg, "--folds", "2"]):
        capsys.readouterr()
        assert cli.main(args) == 0
        assert "3 finished fold(s) in the table: 0, 1, 2" in capsys.readouterr().out
        pd.testing.assert_frame_equal(pd.read_csv(run / "results_folds.csv"), before)
        assert (run / "results.csv").read_text() == summary
        m = json.loads((run / "manifest.json").read_text())
        assert m["folds"] == [0, 1, 2] and m["run_folds"] == [int(args[-1])]

    # A fold that is not finished is not in the table; running another one does not lose the finished ones.
    (run / "fold_2" / "results.json").unlink()
    (run / "fold_2" / "last.pt").unlink()
    assert cli.main(["train", "--config", cfg, "--fold", "0"]) == 0
    assert list(pd.read_csv(run / "results_folds.csv")["fold"]) == [0, 1]
    assert json.loads((run / "manifest.json").read_text())["folds"] == [0, 1]


def test_stale_folds_of_a_larger_k_are_refused_then_removed(cohort, capsys):
    root, feats, labels = cohort
    raw = raw_config(root, feats, labels)
    raw["data"]["k"] = 3
    assert cli.main(["crossval", "--config", write_yaml(root / "c3.yaml", raw)]) == 0
    raw["data"]["k"] = 2
    cfg = write_yaml(root / "c2.yaml", raw)
    capsys.readouterr()
    assert cli.main(["crossval", "--config", cfg]) == 2
    err = capsys.readouterr().err
    assert "fold 2: not a fold of this run (data.k 3 -> 2)" in err
    assert cli.main(["crossval", "--config", cfg, "--overwrite"]) == 0
    assert "fold 2: made with another configuration" in capsys.readouterr().out
    assert sorted(p.name for p in (root / "run").glob("fold_*")) == ["fold_0", "fold_1"]
    assert list(pd.read_csv(root / "run" / "results_folds.csv")["fold"]) == [0, 1]


def test_split_folders_hold_one_k(cohort, capsys):
    root, feats, labels = cohort
    sp = root / "sp"
    assert cli.main(["splits", "--labels", str(labels), "--out", str(sp), "--k", "3"]) == 0
    three = {p.name: p.read_text() for p in sp.iterdir()}
    capsys.readouterr()
    # Writing over an existing split folder is refused, whatever the k; nothing changes.
    assert cli.main(["splits", "--labels", str(labels), "--out", str(sp), "--k", "2"]) == 2
    err = capsys.readouterr().err
    assert "already holds 3 split file(s)" in err and "--overwrite" in err
    assert {p.name: p.read_text() for p in sp.iterdir()} == three
    # --overwrite replaces the folder's splits: the stale splits_2.csv goes.
    assert cli.main(["splits", "--labels", str(labels), "--out", str(sp), "--k", "2", "--overwrite"]) == 0
    assert sorted(p.name for p in sp.iterdir()) == ["splits_0.csv", "splits_1.csv"]


def test_crossval_reads_data_k_splits_and_each_patient_tested_once(cohort, capsys):
    root, feats, labels = cohort
    sp = root / "sp"
    assert cli.main(["splits", "--labels", str(labels), "--out", str(sp), "--k", "3"]) == 0
    raw = raw_config(root, feats, labels)
    raw["data"]["split_dir"] = str(sp)  # k: 2 in the config, 3 files in the folder
    cfg = write_yaml(root / "c.yaml", raw)
    capsys.readouterr()
    assert cli.main(["crossval", "--config", cfg]) == 2
    assert "data.k = 2 needs splits_0 .. splits_1" in capsys.readouterr().err
    assert not (root / "run").exists()

    # Hand-made splits where p0 is tested in both folds (and p1 in none): refused, naming them.
    sp2 = root / "sp2"
    sp2.mkdir()
    ids = [f"p{i}" for i in range(8)]
    pd.DataFrame({"train": ids[4:], "val": [""] * 4, "test": ids[:4]}).to_csv(sp2 / "splits_0.csv", index=False)
    pd.DataFrame({"train": ids[1:4] + [""], "val": [""] * 4, "test": [ids[0]] + ids[5:]}).to_csv(
        sp2 / "splits_1.csv", index=False)
    raw["data"]["split_dir"] = str(sp2)
    assert cli.main(["crossval", "--config", write_yaml(root / "c2.yaml", raw)]) == 2
    err = capsys.readouterr().err
    assert "p0 in folds [0, 1]" in err and "more than one fold" in err
    assert not (root / "run").exists()
    pd.DataFrame({"train": ids[:4], "val": [""] * 4, "test": ids[4:]}).to_csv(sp2 / "splits_1.csv", index=False)
    pd.DataFrame({"train": ids[5:], "val": [""] * 3, "test": ids[1:4]}).to_csv(sp2 / "splits_0.csv", index=False)
    assert cli.main(["crossval", "--config", write_yaml(root / "c3.yaml", raw)]) == 2
    assert "in no fold's test part" in capsys.readouterr().err and not (root / "run").exists()


def test_demo_style_rerun_with_other_data_seed_is_refused(cohort):
    root, feats, labels = cohort
    cfg = parse_config(raw_config(root, feats, labels))
    assert crossval(cfg).ok
    other = parse_config({**raw_config(root, feats, labels), "data": {**raw_config(root, feats, labels)["data"],
                                                                      "seed": 1}})
    with pytest.raises(RunConflictError, match=r"data\.seed 0 -> 1"):
        crossval(other)
    # The label table's content is part of the description: an edited table is another run.
    df = pd.read_csv(labels)
    df.loc[0, "label"] = 1 - df.loc[0, "label"]
    df.to_csv(labels, index=False)
    with pytest.raises(RunConflictError, match="labels_sha256"):
        crossval(cfg)
