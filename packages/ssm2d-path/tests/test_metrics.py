"""Metrics against brute-force definitions written here (pairwise AUC and C-index with ties, confusion
counts, a hand log-rank statistic)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ssm2d_path import metrics as M


def _auc_pairs(pos, s):
    p, n = s[pos], s[~pos]
    tot = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in p for b in n)
    return tot / (len(p) * len(n))


def test_binary_and_macro_auc_match_pairwise_counts_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    s = rng.integers(0, 6, 60).astype(float)  # many ties
    assert M.binary_auc(y == 1, s) == pytest.approx(_auc_pairs(y == 1, s), abs=1e-12)
    probs2 = np.stack([1 - s / 10, s / 10], 1)
    assert M.macro_ovr_auc(y, probs2) == pytest.approx(_auc_pairs(y == 1, s / 10), abs=1e-12)
    y3 = rng.integers(0, 3, 80)
    p3 = rng.dirichlet(np.ones(3), 80).round(1)  # rounding makes ties
    ref = np.mean([_auc_pairs(y3 == k, p3[:, k]) for k in range(3)])
    assert M.macro_ovr_auc(y3, p3) == pytest.approx(ref, abs=1e-12)
    assert math.isnan(M.binary_auc(np.ones(4, bool), np.arange(4.0)))


def test_accuracy_balanced_accuracy_f1_match_confusion_counts():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 50)
    p = rng.integers(0, 3, 50)
    conf = np.zeros((3, 3))
    for a, b in zip(y, p):
        conf[a, b] += 1
    assert M.accuracy(y, p) == pytest.approx(np.trace(conf) / 50)
    assert M.balanced_accuracy(y, p) == pytest.approx(np.mean([conf[k, k] / conf[k].sum() for k in range(3)]))
    f1 = []
    for k in range(3):
        prec = conf[k, k] / conf[:, k].sum()
        rec = conf[k, k] / conf[k].sum()
        f1.append(2 * prec * rec / (prec + rec))
    assert M.macro_f1(y, p, 3) == pytest.approx(np.mean(f1))
    m = M.classification_metrics(y, np.eye(3)[p])
    assert m["acc"] == pytest.approx(np.trace(conf) / 50) and set(m) == {"auc", "acc", "bacc", "f1"}


def _harrell(t, r, e):
    num = den = 0.0
    for i in range(len(t)):
        if not e[i]:
            continue
        for j in range(len(t)):
            # i had the event first; j outlived it (a later time, or censored at the same time).
            if t[j] > t[i] or (t[j] == t[i] and not e[j]):
                den += 1
                num += 1.0 if r[i] > r[j] else 0.5 if r[i] == r[j] else 0.0
    return num / den


def test_cindex_matches_brute_force_harrell_with_ties():
    rng = np.random.default_rng(2)
    for _ in range(5):
        t = rng.integers(1, 15, 40).astype(float)  # tied times
        r = rng.integers(0, 5, 40).astype(float)  # tied risks
        c = (rng.random(40) < 0.4).astype(int)
        assert M.c_index(t, r, c) == pytest.approx(_harrell(t, r, 1 - c), abs=1e-12)


def test_cindex_without_events_is_nan_and_says_so(caplog):
    assert math.isnan(M.c_index([1.0, 2.0, 3.0], [0.1, 0.2, 0.3], [1, 1, 1]))
    assert "no event" in caplog.text


def _logrank_p(t1, e1, t2, e2):
    from scipy.stats import chi2

    t = np.concatenate([t1, t2]); e = np.concatenate([e1, e2]); g = np.r_[np.ones(len(t1)), np.zeros(len(t2))]
    o_e = var = 0.0
    for s in np.unique(t[e == 1]):
        at = t >= s
        n, n1 = at.sum(), (at & (g == 1)).sum()
        d = ((t == s) & (e == 1)).sum()
        d1 = ((t == s) & (e == 1) & (g == 1)).sum()
        o_e += d1 - d * n1 / n
        if n > 1:
            var += d * (n1 / n) * (1 - n1 / n) * (n - d) / (n - 1)
    return chi2.sf(o_e ** 2 / var, 1)


def test_km_groups_split_at_median_and_logrank_matches_hand_statistic():
    rng = np.random.default_rng(3)
    risk = rng.normal(size=60)
    t = rng.exponential(np.exp(-risk)) * 10
    c = (rng.random(60) < 0.3).astype(int)
    g = M.km_risk_groups(t, risk, c)
    assert g["high"].sum() == 30 and np.all(risk[g["high"]] > np.median(risk))
    ref = _logrank_p(t[g["high"]], 1 - c[g["high"]], t[~g["high"]], 1 - c[~g["high"]])
    assert g["p_value"] == pytest.approx(ref, rel=1e-6)
    assert set(g["curves"]) == {"low", "high"} and g["curves"]["low"]["survival"].iloc[0] == 1.0


def test_results_table_mean_std_csv_and_markdown(tmp_path):
    import pandas as pd

    rows = [{"model": "a", "fold": i, "test_auc": v} for i, v in enumerate([0.6, 0.7, 0.9])]
    rows += [{"model": "b", "fold": 0, "test_auc": 0.5}, {"model": "b", "fold": 1, "test_auc": 0.55}]
    csv, md_path, md = M.write_results_table(rows, tmp_path, group_keys=["model"])
    df = pd.read_csv(csv)
    a = df[df.model == "a"].iloc[0]
    assert a["test_auc_mean"] == pytest.approx(np.mean([0.6, 0.7, 0.9]))
    assert a["test_auc_std"] == pytest.approx(np.std([0.6, 0.7, 0.9], ddof=1))
    assert int(a["n_folds"]) == 3
    assert f"{np.mean([0.6, 0.7, 0.9]):.3f} ± {np.std([0.6, 0.7, 0.9], ddof=1):.3f}" in md
    assert md_path.read_text() == md and (tmp_path / "results_folds.csv").is_file()
