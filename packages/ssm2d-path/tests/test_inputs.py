"""Every bad input is refused up front with a clear message: feature files (all checked before any fold
trains, listed together; left out only with --skip-bad-files, and then recorded), config ranges, the
device, the grid-cell budget, `--set` values, checkpoints for eval; and what the workflow writes is
readable by colleagues (umask) and free of progress-bar noise when the output is not a terminal."""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from contextlib import redirect_stderr
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _featfiles import write_clam_h5, write_trident  # noqa: E402
from test_runs import make_cohort, raw_config, write_yaml  # noqa: E402

from ssm2d_path import cli  # noqa: E402
from ssm2d_path.config import ConfigError, parse_config  # noqa: E402

GRID = np.array([(c * 256, r * 256) for r in range(3) for c in range(3)])


def _add_patient(feats, labels, sid, label):
    df = pd.read_csv(labels)
    df = pd.concat([df, pd.DataFrame([{"case_id": f"p_{sid}", "slide_id": sid, "label": label}])])
    df.to_csv(labels, index=False)
    return feats / f"{sid}.h5"


def _bad_cohort(root):
    """The tiny cohort plus one patient per kind of bad feature file. Returns (feats, labels, {slide: text})."""
    feats, labels = make_cohort(root)
    rng = np.random.default_rng(1)
    f9 = rng.normal(size=(9, 4)).astype(np.float32)
    bad = {}
    p = _add_patient(feats, labels, "truncated", 0)
    write_trident(p, f9, GRID, psl0=256)
    p.write_bytes(p.read_bytes()[:800])
    bad["truncated"] = "cannot be opened as HDF5"
    _add_patient(feats, labels, "not_hdf5", 1).write_text("slide,features\n")
    bad["not_hdf5"] = "cannot be opened as HDF5"
    write_trident(_add_patient(feats, labels, "three_d", 0), f9, GRID, psl0=256)
    with h5py.File(feats / "three_d.h5", "r+") as f:
        del f["features"]
        f.create_dataset("features", data=np.zeros((9, 2, 2), np.float32)).attrs["encoder"] = "enc"
    bad["three_d"] = "features must be 2-D"
    write_clam_h5(_add_patient(feats, labels, "no_coords", 1), f9)
    bad["no_coords"] = "no 'coords' dataset"
    write_trident(_add_patient(feats, labels, "mismatch", 0), f9, GRID[:8], psl0=256)
    bad["mismatch"] = "9 feature rows but 8 coords rows"
    write_trident(_add_patient(feats, labels, "duplicate", 1), f9, np.vstack([GRID[:8], GRID[:1]]), psl0=256)
    bad["duplicate"] = "duplicate coords"
    write_trident(_add_patient(feats, labels, "off_lattice", 0), f9, np.vstack([GRID[:8], [[256, 100]]]), psl0=256)
    bad["off_lattice"] = "not on a lattice"
    nan = f9.copy()
    nan[3, 1] = np.nan
    write_trident(_add_patient(feats, labels, "with_nan", 1), nan, GRID, psl0=256)
    bad["with_nan"] = "1 of 9 feature rows contain NaN"
    write_trident(_add_patient(feats, labels, "outlier", 0), f9, np.vstack([GRID[:8], [[10 ** 9, 10 ** 9]]]), psl0=256)
    bad["outlier"] = "data.max_grid_cells"
    return feats, labels, bad


def test_every_bad_feature_file_is_listed_before_any_training(tmp_path, capsys):
    feats, labels, bad = _bad_cohort(tmp_path)
    cfg = write_yaml(tmp_path / "c.yaml", raw_config(tmp_path, feats, labels))
    assert cli.main(["crossval", "--config", cfg]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{len(bad)} feature file(s) of the cohort are unusable" in err and "--skip-bad-files" in err
    for slide, text in bad.items():
        # each file named once, with its own problem right after its name
        assert err.count(f"{slide}.h5") == 1
        assert text in err.split(f"{slide}.h5", 1)[1].split(".h5")[0]
    assert "3,906,251 x 3,906,251" in err  # the outlier's grid, before anything allocates it
    assert not (tmp_path / "run").exists()  # no fold started, nothing written


def test_skip_bad_files_leaves_them_out_and_records_them(tmp_path, capsys):
    feats, labels, bad = _bad_cohort(tmp_path)
    cfg = write_yaml(tmp_path / "c.yaml", raw_config(tmp_path, feats, labels, selection="last"))
    assert cli.main(["crossval", "--config", cfg, "--skip-bad-files"]) == 0
    out = capsys.readouterr().out
    assert f"{len(bad)} slide(s) left out (data.skip_bad_files)" in out
    run = tmp_path / "run"
    m = json.loads((run / "manifest.json").read_text())
    recorded = {s["slide"]: s["reason"] for s in m["skipped_slides"]}
    assert set(recorded) == set(bad) and all(text in recorded[s] for s, text in bad.items())
    for f in (0, 1):
        r = json.loads((run / f"fold_{f}" / "results.json").read_text())
        assert {s["slide"] for s in r["skipped_slides"]} == set(bad)
    r0, r1 = (json.loads((run / f"fold_{f}" / "results.json").read_text()) for f in (0, 1))
    assert r0["n_test"] + r1["n_test"] == 8  # the 8 good patients, each tested once


def test_grid_cell_budget_is_configurable(tmp_path, capsys):
    feats, labels = make_cohort(tmp_path)  # every slide is 3 x 3 = 9 cells
    raw = raw_config(tmp_path, feats, labels)
    raw["data"]["max_grid_cells"] = 8
    assert cli.main(["crossval", "--config", write_yaml(tmp_path / "c.yaml", raw)]) == 2
    err = capsys.readouterr().err
    assert "8 feature file(s)" in err and "3 x 3 = 9 cells, more than the budget of 8 (data.max_grid_cells)" in err
    raw["data"]["max_grid_cells"] = 9
    assert cli.main(["crossval", "--config", write_yaml(tmp_path / "c.yaml", raw)]) == 0


@pytest.mark.parametrize("override, key", [
    ("train.lr=.nan", "train.lr: must be a finite number"),
    ("train.weight_decay=.inf", "train.weight_decay: must be a finite number"),
    ("train.max_grad_norm=0", "train.max_grad_norm: must be > 0"),
    ("train.min_lr=1.0", "train.min_lr: must be <= train.lr"),
    ("model.dim=-16", "model.dim: a size must be a positive integer, got -16"),
    ("model.dropout=2.0", "model.dropout: a dropout rate must be in [0, 1), got 2.0"),
    ("model.attn_dim=.nan", "model.attn_dim: must be a finite number"),
    ("train.device=cuda:first", "train.device: expected 'auto', 'cpu', 'cuda' or 'cuda:<i>'"),
    ("data.max_grid_cells=0", "data.max_grid_cells: must be >= 1"),
    ("train.lr=!!python/object/apply:os.system ['echo pwned']", "a Python object tag (!!python/...) is not a value"),
])
def test_config_values_are_range_checked(tmp_path, capsys, override, key):
    feats, labels = make_cohort(tmp_path, n=4)
    cfg = write_yaml(tmp_path / "c.yaml", raw_config(tmp_path, feats, labels))
    assert cli.main(["crossval", "--config", cfg, "--set", override]) == 2
    err = capsys.readouterr().err
    assert key in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_python_tags_in_set_are_refused_by_every_command(tmp_path, capsys):
    marker = tmp_path / "marker"
    bad = f"patch.overlap=!!python/object/apply:os.system ['touch {marker}']"
    assert cli.main(["patch", "--slides", str(tmp_path), "--job-dir", str(tmp_path / "j"), "--set", bad]) == 2
    err = capsys.readouterr().err
    assert "--set" in err and "!!python" in err and "Traceback" not in err and not marker.exists()


def test_a_fold_without_validation_bags_is_refused_before_training(tmp_path, capsys):
    feats, labels = make_cohort(tmp_path, n=4)  # 2 training patients per fold: 20 % of them rounds to none
    cfg = write_yaml(tmp_path / "c.yaml", raw_config(tmp_path, feats, labels))
    assert cli.main(["crossval", "--config", cfg]) == 2
    err = capsys.readouterr().err
    assert "fold 0: its validation part holds no bag with features" in err and "data.val_fraction" in err
    assert not (tmp_path / "run").exists()


def test_model_arguments_the_constructor_refuses_fail_before_training(tmp_path, capsys):
    feats, labels = make_cohort(tmp_path, n=4)
    raw = raw_config(tmp_path, feats, labels)
    raw["model"] = {"name": "transmil", "dim": 6}  # Nystrom attention: dim must split into its 8 heads
    assert cli.main(["crossval", "--config", write_yaml(tmp_path / "c.yaml", raw)]) == 2
    err = capsys.readouterr().err
    assert "model: transmil cannot be built with dim=6" in err and not (tmp_path / "run").exists()


def test_a_device_that_is_not_there_is_refused_up_front(tmp_path, capsys):
    feats, labels = make_cohort(tmp_path, n=4)
    cfg = write_yaml(tmp_path / "c.yaml", raw_config(tmp_path, feats, labels))
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert cli.main(["crossval", "--config", cfg, "--set", f"train.device=cuda:{n}"]) == 2
    err = capsys.readouterr().err
    assert f"train.device: 'cuda:{n}' requested but" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()
    assert cli.main(["demo", "--quick", "--out", str(tmp_path / "d"), "--device", f"cuda:{n}"]) == 2
    assert "--device" in capsys.readouterr().err and not (tmp_path / "d").exists()


def test_eval_uses_the_checkpoints_model_and_refuses_pickled_objects_clearly(tmp_path, capsys):
    feats, labels = make_cohort(tmp_path)
    raw = raw_config(tmp_path, feats, labels)
    assert cli.main(["crossval", "--config", write_yaml(tmp_path / "c.yaml", raw)]) == 0
    fold = tmp_path / "run" / "fold_0"
    # A config whose model section describes another model: eval rebuilds the checkpoint's own (model.json).
    raw["model"] = {"name": "transmil", "dim": 64}
    cfg = write_yaml(tmp_path / "other.yaml", raw)
    args = ["eval", "--config", cfg, "--checkpoint", str(fold / "model.pt"), "--split", str(tmp_path / "run" / "splits"),
            "--fold", "0", "--out", str(tmp_path / "ev")]
    capsys.readouterr()
    assert cli.main(args) == 0
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    ref = json.loads((fold / "results.json").read_text())["test"]
    assert ev["loss"] == pytest.approx(ref["loss"]) and ev["acc"] == pytest.approx(ref["acc"])
    assert json.loads((tmp_path / "ev" / "manifest.json").read_text())["model_card"]["name"] == "abmil"

    # A checkpoint holding a pickled object: refused, saying what is wrong, never advising an unsafe load.
    torch.save({"model": argparse.Namespace(a=1)}, fold / "model.pt")
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "argparse.Namespace" in err and "only weights are read" in err and err.count("\n") == 1
    assert "weights_only" not in err and "Re-running" not in err


def test_atomic_files_follow_the_umask(tmp_path):
    from ssm2d_path.manifest import write_json_atomic
    from ssm2d_path.data import make_splits, write_splits, LabelTable

    old = os.umask(0o022)
    try:
        p = write_json_atomic(tmp_path / "a.json", {"x": 1})
        assert p.stat().st_mode & 0o777 == 0o644
        os.umask(0o007)
        write_json_atomic(tmp_path / "a.json", {"x": 2})
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o660
        feats, labels = make_cohort(tmp_path / "c", n=4)
        for f in write_splits(tmp_path / "sp", make_splits(LabelTable.read(labels, "classification"), k=2)):
            assert f.stat().st_mode & 0o777 == 0o660
    finally:
        os.umask(old)


def test_progress_bars_only_on_a_terminal(tmp_path):
    feats, labels = make_cohort(tmp_path)
    cfg = parse_config(raw_config(tmp_path, feats, labels, progress=True))
    from ssm2d_path.crossval import crossval

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    log = io.StringIO()
    with redirect_stderr(log):
        assert crossval(cfg, folds=[0]).ok
    assert "\r" not in log.getvalue() and "epoch 1/2" not in log.getvalue()
    from ssm2d_path.train import progress_bar

    term = Terminal()
    bar = progress_bar(range(3), desc="epoch 1/2", file=term)
    list(bar)
    bar.close()
    assert "\r" in term.getvalue() and "epoch 1/2" in term.getvalue()


def test_config_errors_name_the_key_in_python_too():
    with pytest.raises(ConfigError, match=r"train\.lr: must be a finite number"):
        parse_config({"train": {"lr": float("nan")}})
    with pytest.raises(ConfigError, match=r"model\.dim: a size must be a positive integer"):
        parse_config({"model": {"name": "2dmambamil", "dim": -16}})
    with pytest.raises(ConfigError, match=r"model\.dropout: a dropout rate must be in \[0, 1\)"):
        parse_config({"model": {"name": "abmil", "dropout": 2.0}})
