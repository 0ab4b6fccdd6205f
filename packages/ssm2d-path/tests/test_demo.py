"""The demo cohort (checked from its files, independently of the generator's own bookkeeping), the
``demo --quick`` command end to end, and the splits/crossval/train/eval commands on its data."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from ssm2d_path import cli
from ssm2d_path.demo import DemoSettings, generate_cohort, run_demo


def _read_cohort(root: Path):
    """Per slide from the h5 files: (N, n_A, n_B, vertical A-over-B contacts), patch types taken as the
    nearest of the three prototypes."""
    protos = np.array(json.loads((root / "cohort.json").read_text())["prototypes"])
    out = {}
    for f in sorted((root / "20x_256px_0px_overlap" / "features_synthetic").glob("*.h5")):
        with h5py.File(f, "r") as h:
            x = h["features"][:]
            xy = h["coords"][:]
            stride = int(h["coords"].attrs["patch_size_level0"])
        kind = np.argmin(((x[:, None, :] - protos[None]) ** 2).sum(-1), axis=1)
        cells = {(int(a), int(b)): int(k) for (a, b), k in zip((xy - xy.min(0)) // stride, kind)}
        contacts = sum(1 for (cx, cy), k in cells.items() if k == 1 and cells.get((cx, cy + 1)) == 2)
        out[f.stem] = (len(x), int((kind == 1).sum()), int((kind == 2).sum()), contacts)
    return out


def test_cohorts_have_identical_bag_statistics_per_class_and_risk(tmp_path):
    settings = DemoSettings(n_pairs=12, n_patients=80, grid=(12, 16))
    paths = generate_cohort(tmp_path, settings, seed=3)
    stats = _read_cohort(paths["classification"]["root"])
    labels = pd.read_csv(paths["classification"]["labels"]).set_index("slide_id")["label"]
    per_class = {c: Counter(stats[s][:3] for s in labels.index if labels[s] == c) for c in (0, 1)}
    assert sum(per_class[0].values()) == sum(per_class[1].values()) == 12
    assert per_class[0] == per_class[1]  # same multiset of (patches, A, B)
    for s, lab in labels.items():
        n, a, b, contacts = stats[s]
        assert a == b and a >= 5
        assert contacts == (a if lab == 1 else 0)  # class 1: every A above a B; class 0: none

    surv = _read_cohort(paths["survival"]["root"])
    df = pd.read_csv(paths["survival"]["labels"]).set_index("slide_id")
    m = settings.surv_motifs
    # The A/B counts do not depend on the risk: every patient has exactly m of each, touching or not.
    assert all(v[1] == v[2] == m for v in surv.values())
    contacts = np.array([surv[s][3] for s in df.index])
    assert set(contacts) == set(range(m + 1))  # every level of the risk occurs
    # The slide size does not follow the risk either (rank correlation near 0; 3 sigma for 80 patients).
    n_patches = np.array([surv[s][0] for s in df.index], dtype=float)
    rc, rn = np.argsort(np.argsort(contacts + 1e-6 * np.arange(len(contacts)))), np.argsort(np.argsort(n_patches))
    assert abs(np.corrcoef(rc, rn)[0, 1]) < 3 / np.sqrt(len(df) - 1)
    lo, hi = settings.surv_grid
    assert all(v[0] <= hi * hi for v in surv.values())
    assert abs(df["censorship"].mean() - settings.surv_censored) < 0.15
    t, e = df["survival_months"].to_numpy(), 1 - df["censorship"].to_numpy()
    assert t[(contacts >= m - 1) & (e == 1)].mean() < t[(contacts <= 1) & (e == 1)].mean()


def test_demo_quick_end_to_end_and_commands_on_its_data(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--out", str(out), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "2dmambamil" in text and "abmil" in text and "test_cindex" in text and "test_auc" in text
    for cohort in ("classification", "survival"):
        df = pd.read_csv(out / f"results_{cohort}.csv")
        assert set(df["model"]) == {"2dmambamil", "mambamil", "abmil"} and (df["n_folds"] == 3).all()
    m = json.loads((out / "manifest.json").read_text())
    assert m["config"]["demo"] is True and m["seeds"]["demo"] == 0 and len(m["inputs"]["labels"]) == 2
    fold = json.loads((out / "classification" / "2dmambamil" / "fold_0" / "manifest.json").read_text())
    assert fold["scan_backend"] in ("kernel", "reference")
    # the demo trains with its own measured setting (no augmentation), recorded with the recipe it overrides
    train = json.loads((out / "classification" / "2dmambamil" / "fold_0" / "results.json").read_text())["run_config"]["train"]
    assert train["dihedral"] is False and train["feature_noise"] == 0.0 and train["recipe"] == "default"
    assert train["lr"] == pytest.approx(2e-3) and train["selection"] == "last"
    pred = pd.read_csv(out / "survival" / "abmil" / "fold_0" / "predictions_test.csv")
    assert {"bag_id", "time", "censorship", "risk", "surv_3"} <= set(pred.columns)

    # Re-run into the same folder with another seed: refused before anything is rewritten, naming the seed.
    table = (out / "results_survival_folds.csv").read_text()
    first = next((out / "data" / "survival").rglob("*.h5"))
    stamp = first.stat().st_mtime_ns
    assert cli.main(["demo", "--quick", "--out", str(out), "--device", "cpu", "--seed", "1", "--no-slide"]) == 2
    err = capsys.readouterr().err
    assert "seed 0 -> 1" in err and "--overwrite" in err and err.count("\n") == 1
    assert first.stat().st_mtime_ns == stamp and (out / "results_survival_folds.csv").read_text() == table
    # The same settings again: every fold is finished with them and skipped, and the table is the same.
    assert cli.main(["demo", "--quick", "--out", str(out), "--device", "cpu", "--no-slide",
                     "--cohorts", "survival"]) == 0
    text = capsys.readouterr().out
    assert "folds 0, 1, 2: finished with this configuration, skipped" in text and "started" not in text
    pd.testing.assert_frame_equal(pd.read_csv(out / "results_survival_folds.csv"), pd.read_csv(io.StringIO(table)))

    # splits / crossval / train / eval on the demo's classification data.
    data = out / "data" / "classification"
    assert cli.main(["splits", "--labels", str(data / "labels.csv"), "--out", str(tmp_path / "sp"), "--k", "2"]) == 0
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  feature_dir: {data / '20x_256px_0px_overlap' / 'features_synthetic'}\n"
                   f"  label_csv: {data / 'labels.csv'}\n  split_dir: {tmp_path / 'sp'}\n  k: 2\n"
                   f"model:\n  name: abmil\n  dim: 8\n  attn_dim: 8\n"
                   f"train:\n  epochs: 1\n  progress: false\n  device: cpu\noutput:\n  dir: {tmp_path / 'run'}\n")
    assert cli.main(["crossval", "--config", str(cfg), "--set", "train.lr=1e-3"]) == 0
    assert (tmp_path / "run" / "results.md").is_file() and (tmp_path / "run" / "fold_1" / "results.json").is_file()
    assert cli.main(["train", "--config", str(cfg), "--fold", "1", "--set", f"output.dir={tmp_path / 'one'}"]) == 0
    assert not (tmp_path / "one" / "fold_0").exists() and (tmp_path / "one" / "fold_1" / "model.pt").is_file()
    assert cli.main(["eval", "--config", str(cfg), "--checkpoint", str(tmp_path / "run" / "fold_0" / "model.pt"),
                     "--split", str(tmp_path / "sp"), "--fold", "0", "--out", str(tmp_path / "ev")]) == 0
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    ref = json.loads((tmp_path / "run" / "fold_0" / "results.json").read_text())["test"]
    assert ev["auc"] == pytest.approx(ref["auc"]) and ev["acc"] == pytest.approx(ref["acc"])
    capsys.readouterr()
    assert cli.main(["crossval", "--config", str(cfg), "--set", "train.epoch=3"]) == 2
    assert "train.epoch: unknown key" in capsys.readouterr().err


def test_demo_rejects_unknown_cohorts_before_writing(tmp_path):
    with pytest.raises(ValueError, match="cohorts"):
        run_demo(tmp_path / "d", quick=True, cohorts=["surv"])
    assert not (tmp_path / "d").exists()
