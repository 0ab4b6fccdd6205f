"""Label tables, patient-level splits and their CSV files, and the bag dataset on real feature files."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _featfiles as ff  # noqa: E402

from ssm2d_path.data import BagDataset, LabelTable, Split, make_splits, read_splits, write_splits  # noqa: E402


def _cohort(rng, n_cases=40, classes=("LUAD", "LUSC", "MESO"), p=(0.45, 0.3, 0.25)):
    rows = []
    for i in range(n_cases):
        lab = rng.choice(classes, p=p)
        for j in range(int(rng.integers(1, 4))):
            rows.append({"case_id": f"P{i:03d}", "slide_id": f"P{i:03d}-S{j}.svs", "label": lab,
                         "survival_months": None, "censorship": None})
    df = pd.DataFrame(rows)
    t = {c: float(rng.exponential(30)) for c in df.case_id.unique()}
    cen = {c: int(rng.random() < 0.4) for c in df.case_id.unique()}
    df["survival_months"] = df.case_id.map(t)
    df["censorship"] = df.case_id.map(cen)
    return df


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def test_classification_table(tmp_path, rng):
    df = _cohort(rng)
    df.to_csv(tmp_path / "t.csv", index=False)
    t = LabelTable.read(tmp_path / "t.csv")
    assert t.classes == ["LUAD", "LUSC", "MESO"]
    assert t.cases() == list(dict.fromkeys(df.case_id))
    case = df.case_id.iloc[0]
    slides = [s[:-4] for s in df.slide_id[df.case_id == case]]  # ".svs" stripped: ids are file stems
    assert t.slides_of(case) == slides and t.case_of(slides[0]) == case
    want = t.classes.index(df.label[df.case_id == case].iloc[0])
    assert t.label_of(case) == want and t.label_of(slides[-1]) == want
    with pytest.raises(ValueError, match="for classification, not survival"):
        t.survival_of(case)
    with pytest.raises(KeyError, match="nope"):
        t.label_of("nope")
    t2 = LabelTable(df, label_map={"LUAD": 0, "LUSC": 1, "MESO": 1})
    assert t2.classes == ["LUAD", "LUSC|MESO"] and t2.label_of(slides[0]) == min(want, 1)


def test_numeric_labels_sort_numerically():
    df = pd.DataFrame({"case_id": list("abcd"), "slide_id": list("abcd"), "label": [10, 2, 1, 2]})
    t = LabelTable(df)
    assert t.classes == ["1", "2", "10"] and t.label_of("a") == 2


def test_table_errors(tmp_path):
    base = {"case_id": ["a", "a", "b"], "slide_id": ["s1", "s2", "s3"]}
    with pytest.raises(ValueError, match="disagree.*'a'"):
        LabelTable(pd.DataFrame({**base, "label": [0, 1, 1]}))
    with pytest.raises(ValueError, match="no label column 'label'"):
        LabelTable(pd.DataFrame({**base, "y": [0, 0, 1]}))
    with pytest.raises(ValueError, match="more than once"):
        LabelTable(pd.DataFrame({"case_id": ["a", "b"], "slide_id": ["s", "s.svs"], "label": [0, 1]}))
    with pytest.raises(ValueError, match="not in label_map"):
        LabelTable(pd.DataFrame({**base, "label": ["x", "x", "y"]}), label_map={"x": 0})
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        LabelTable.read(tmp_path / "missing.csv")


def test_survival_polarity(rng):
    df = _cohort(rng, n_cases=12)
    t = LabelTable(df, "survival")
    case = df.case_id.iloc[3]
    row = df[df.case_id == case].iloc[0]
    assert t.survival_of(case) == (pytest.approx(row.survival_months), int(row.censorship))
    # STAMP-like table: 'status' = 1 when the event was observed; censorship must be its complement.
    stamp = df.drop(columns=["censorship"]).assign(status=1 - df.censorship)
    with pytest.raises(ValueError, match="event_col"):
        LabelTable(stamp, "survival")
    t2 = LabelTable(stamp, "survival", event_col="status")
    for c in t2.cases():
        assert t2.survival_of(c)[1] == 1 - int(stamp.status[stamp.case_id == c].iloc[0])
        assert t2.survival_of(c) == t.survival_of(c)
    np.testing.assert_array_equal(t2.df.event, 1 - t2.df.censorship)
    with pytest.raises(ValueError, match="0 or 1"):
        LabelTable(df.assign(censorship=2), "survival")
    with pytest.raises(ValueError, match="non-negative"):
        LabelTable(df.assign(survival_months=-1.0), "survival")


def _check_partition(table, splits, k, level="patient"):
    ids = table.cases() if level == "patient" else table.slides()
    assert len(splits) == k
    tests = [x for s in splits for x in s.test]
    assert sorted(tests) == sorted(ids)  # every bag in exactly one test fold
    for s in splits:
        parts = [set(s.train), set(s.val), set(s.test)]
        assert sum(map(len, parts)) == len(ids) and set().union(*parts) == set(ids)
        # no patient straddles two parts
        owner = {}
        for name, part in zip("tvT", parts):
            for x in part:
                case = x if level == "patient" else table.case_of(x)
                assert owner.setdefault(case, name) == name


def test_classification_splits_invariants(rng):
    table = LabelTable(_cohort(rng, n_cases=53))
    k = 5
    splits = make_splits(table, k, seed=3, val_fraction=0.2)
    _check_partition(table, splits, k)
    labels = {c: table.label_of(c) for c in table.cases()}
    for cls in range(len(table.classes)):
        per_fold = [sum(labels[c] == cls for c in s.test) for s in splits]
        assert max(per_fold) - min(per_fold) <= 1, per_fold
    sizes = [len(s.test) for s in splits]
    assert max(sizes) - min(sizes) <= 1
    for s in splits:
        n_train = len(s.train) + len(s.val)
        assert len(s.val) == round(0.2 * n_train)
        for cls in range(len(table.classes)):  # validation drawn per class
            n_c = sum(labels[c] == cls for c in s.train + s.val)
            v_c = sum(labels[c] == cls for c in s.val)
            assert abs(v_c - 0.2 * n_c) < 1.0 + 1e-9 and v_c < n_c
    assert make_splits(table, k, seed=3, val_fraction=0.2) == splits
    assert make_splits(table, k, seed=4, val_fraction=0.2) != splits
    # Row order of the table does not change the splits.
    shuffled = LabelTable(table.df.sample(frac=1.0, random_state=0).rename(columns={"label_name": "label"})
                          .drop(columns=["label"]).assign(label=lambda d: d.case_id.map(
                              {c: table.classes[v] for c, v in labels.items()})))
    assert make_splits(shuffled, k, seed=3, val_fraction=0.2) == splits


def test_slide_level_splits_keep_patients_together(rng):
    table = LabelTable(_cohort(rng, n_cases=30))
    splits = make_splits(table, 4, seed=0, level="slide")
    _check_partition(table, splits, 4, level="slide")
    cases_of_test = [{table.case_of(s) for s in sp.test} for sp in splits]
    assert cases_of_test == [set(s.test) for s in make_splits(table, 4, seed=0)]


def test_tiny_class_is_a_clear_error(rng):
    df = pd.DataFrame({"case_id": [f"c{i}" for i in range(12)], "slide_id": [f"s{i}" for i in range(12)],
                       "label": ["a"] * 9 + ["rare"] * 3})
    with pytest.raises(ValueError, match="k=5.*.rare.: 3"):
        make_splits(LabelTable(df), 5)
    splits = make_splits(LabelTable(df), 3, val_fraction=0.0)
    assert all(sum(x in {"c9", "c10", "c11"} for x in s.test) == 1 for s in splits)
    assert all(s.val == [] for s in splits)
    with pytest.raises(ValueError, match="patients cannot fill"):
        make_splits(LabelTable(df.iloc[:3].assign(label="a")), 5)


def test_survival_splits_stratified_by_event(rng):
    table = LabelTable(_cohort(rng, n_cases=47), "survival")
    splits = make_splits(table, 5, seed=1)
    _check_partition(table, splits, 5)
    events = {c: 1 - table.survival_of(c)[1] for c in table.cases()}
    for e in (0, 1):
        per_fold = [sum(events[c] == e for c in s.test) for s in splits]
        assert max(per_fold) - min(per_fold) <= 1, per_fold
    times = {c: table.survival_of(c)[0] for c in table.cases()}
    med = np.median(list(times.values()))
    long_ = [sum(times[c] > med for c in s.test) for s in splits]
    assert max(long_) - min(long_) <= 3  # time bins balanced too (4 bins x 2 event states)


def test_splits_csv_roundtrip_and_clam_format(tmp_path, rng):
    table = LabelTable(_cohort(rng, n_cases=25))
    splits = make_splits(table, 5, seed=0)
    paths = write_splits(tmp_path / "sp", splits)
    assert [p.name for p in paths] == [f"splits_{i}.csv" for i in range(5)]
    assert read_splits(tmp_path / "sp") == splits
    assert read_splits(paths[2]) == [splits[2]]
    text = paths[0].read_text().splitlines()
    assert text[0] == "train,val,test" and len(text) == 1 + len(splits[0].train)
    assert text[-1].endswith(",,")  # ragged columns padded with empty cells
    # CLAM's file: pandas' unnamed index column, ids that look like numbers, companion files.
    clam = tmp_path / "clam"
    clam.mkdir()
    (clam / "splits_0.csv").write_text(",train,val,test\n0,001,003,005\n1,002,,006\n2,004,,\n")
    (clam / "splits_0_bool.csv").write_text(",train,val,test\n001,True,False,False\n")
    (clam / "splits_1.csv").write_text(",train,val\n0,a,b\n")
    got = read_splits(clam)
    assert got == [Split(["001", "002", "004"], ["003"], ["005", "006"]), Split(["a"], ["b"], [])]
    (clam / "splits_2.csv").write_text("train,val,test\nx,y,x\n")
    with pytest.raises(ValueError, match="splits_2.csv.*'x'"):
        read_splits(clam)
    with pytest.raises(FileNotFoundError):
        read_splits(tmp_path / "nothing")


# ------------------------------------------------------------------------------------------------
# BagDataset


def _slide(path, rng, stride, h, w, f=8):
    r, c = ff.lattice(rng, h, w)
    x = np.stack([c * stride, r * stride], axis=1)
    feats = rng.standard_normal((len(r), f))
    ff.write_trident(path, feats, x, psl0=stride)
    return feats, r, c


def test_bag_dataset_patient_bags_and_reports(tmp_path, rng, caplog):
    d = tmp_path / "features_enc"
    df = pd.DataFrame({"case_id": ["A", "A", "B", "C", "D"], "slide_id": ["a1", "a2", "b1", "c1", "d1"],
                       "label": ["x", "x", "y", "y", "x"]})
    table = LabelTable(df)
    fa1 = _slide(d / "a1.h5", rng, 512, 4, 5)
    fa2 = _slide(d / "a2.h5", rng, 256, 3, 3)
    fb1 = _slide(d / "b1.h5", rng, 256, 2, 6)
    ff.write_trident(d / "c1.h5", np.zeros((0, 8)), np.zeros((0, 2)), psl0=256)  # no tissue
    _slide(d / "extra.h5", rng, 256, 2, 2)  # not in the table
    with caplog.at_level(logging.INFO):
        ds = BagDataset(d, table, level="patient")
    assert ds.ids == ["A", "B"] and len(ds) == 2 and ds.feature_dim == 8
    assert dict(ds.skipped) == {"d1": "no feature file", "c1": "empty: 0 patches"}
    assert "no feature file" in caplog.text and "d1" in caplog.text and "extra" in caplog.text
    ex = ds["A"]
    assert ex.label == table.classes.index("x") and ex.time is None and ex.censorship is None
    assert [s.slide_id for s in ex.bag.slides] == ["a1", "a2"]
    assert [s.stride for s in ex.bag.slides] == [512, 256]
    assert [s.shape for s in ex.bag.slides] == [(4, 5), (3, 3)]
    np.testing.assert_allclose(ex.bag.features.numpy(), np.concatenate([fa1[0], fa2[0]]).astype(np.float32))
    assert ds.files["A"] == [d / "a1.h5", d / "a2.h5"]
    assert ds[1].bag.bag_id == "B" and ds[1].bag.slides[0].shape == (2, 6)
    np.testing.assert_allclose(ds[1].bag.features.numpy(), fb1[0].astype(np.float32))
    assert ds["A"].bag is ex.bag  # cached
    with pytest.raises(KeyError, match="C"):
        ds["C"]
    slide_ds = BagDataset(d, table, level="slide", cache_bytes=0)
    assert slide_ds.ids == ["a1", "a2", "b1"]
    assert slide_ds["a2"].bag is not slide_ds["a2"].bag  # nothing cached


def test_bag_dataset_survival_and_unreadable(tmp_path, rng, caplog):
    d = tmp_path / "f"
    df = pd.DataFrame({"case_id": ["A", "B", "C"], "slide_id": ["a", "b", "c"], "survival_months": [3.5, 10.0, 7.0],
                       "status": [1, 0, 1]})
    table = LabelTable(df, "survival", event_col="status")
    _slide(d / "a.h5", rng, 256, 3, 3)
    _slide(d / "b.h5", rng, 256, 3, 3)
    (d / "c.h5").write_bytes(b"garbage, not hdf5")
    with caplog.at_level(logging.WARNING):
        ds = BagDataset(d, table, level="patient")
    assert ds.ids == ["A", "B"] and ds.skipped[0][0] == "c" and "c.h5" in ds.skipped[0][1]
    ex = ds["A"]
    assert (ex.time, ex.censorship, ex.label) == (3.5, 0, None)
    assert ds["B"].censorship == 1
    with pytest.raises(Exception, match="c.h5"):
        BagDataset(d, table, strict=True)
    _slide(d / "c.h5", rng, 256, 2, 2, f=5)
    with pytest.raises(ValueError, match="feature dimension"):
        BagDataset(d, table)


def test_bag_dataset_clam_folder(tmp_path, rng):
    root = tmp_path / "clam"
    df = pd.DataFrame({"case_id": ["A", "B"], "slide_id": ["s1", "s2"], "label": [0, 1]})
    coords = {}
    for s, fmt in (("s1", "h5"), ("s2", "pt")):
        r, c = ff.lattice(rng, 3, 4)
        x = np.stack([c * 512, r * 512], axis=1)
        coords[s] = (x, r, c)
        feats = rng.standard_normal((len(r), 4))
        if fmt == "h5":
            ff.write_clam_h5(root / "h5_files" / f"{s}.h5", feats, x)
        ff.write_clam_pt(root / "pt_files" / f"{s}.pt", feats)
        ff.write_clam_patches(tmp_path / "patches" / f"{s}.h5", x, patch_size=256, patch_level=1, downsample=(2.0, 2.0))
    ds = BagDataset(root, LabelTable(df), patches_dir=tmp_path / "patches")
    assert ds.files == {"s1": [root / "h5_files" / "s1.h5"], "s2": [root / "pt_files" / "s2.pt"]}
    for s in ("s1", "s2"):
        g = ds[s].bag.slides[0]
        assert g.stride == 512 and g.meta["stride_source"] == "attribute"
        np.testing.assert_array_equal(g.coords, coords[s][0])
        assert g.features.dtype == torch.float32
