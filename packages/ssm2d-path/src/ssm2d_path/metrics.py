"""The metrics the field reports, and the mean +- std table over folds.

Classification (numpy only): accuracy, balanced accuracy, macro F1, macro one-vs-rest AUC (binary: the
AUC of the positive class). Survival: Harrell's C-index through lifelines
(``concordance_index(time, -risk, event)``, ties in risk count 1/2), Kaplan-Meier curves of the predicted
low/high-risk groups (median split) and their log-rank p-value.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
from ssm2d_nn.fileio import atomic_output

__all__ = [
    "accuracy",
    "balanced_accuracy",
    "binary_auc",
    "c_index",
    "classification_metrics",
    "km_risk_groups",
    "macro_f1",
    "macro_ovr_auc",
    "summarize_folds",
    "survival_metrics",
    "write_results_table",
]

log = logging.getLogger(__name__)


def _labels(y, name="y_true") -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{name}: expected a 1D array of class indices, got shape {y.shape}")
    return y.astype(np.int64)


def accuracy(y_true, y_pred) -> float:
    y, p = _labels(y_true), _labels(y_pred, "y_pred")
    if y.size == 0:
        return float("nan")
    return float((y == p).mean())


def balanced_accuracy(y_true, y_pred, n_classes: Optional[int] = None) -> float:
    """Mean per-class recall over the classes present in ``y_true``."""
    y, p = _labels(y_true), _labels(y_pred, "y_pred")
    recalls = [(p[y == k] == k).mean() for k in np.unique(y)]
    return float(np.mean(recalls)) if recalls else float("nan")


def macro_f1(y_true, y_pred, n_classes: Optional[int] = None) -> float:
    """Unweighted mean of per-class F1 over classes in ``range(n_classes)`` (default: those seen in
    either array); a class with no true and no predicted member counts F1 = 0, as scikit-learn does."""
    y, p = _labels(y_true), _labels(y_pred, "y_pred")
    classes = range(n_classes) if n_classes is not None else np.union1d(y, p)
    f1 = []
    for k in classes:
        tp = np.sum((p == k) & (y == k))
        fp = np.sum((p == k) & (y != k))
        fn = np.sum((p != k) & (y == k))
        den = 2 * tp + fp + fn
        f1.append(2 * tp / den if den else 0.0)
    return float(np.mean(f1)) if len(f1) else float("nan")


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank (as scipy.stats.rankdata)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    start = 0
    n = len(x)
    # Runs of equal values: boundaries where the sorted value changes.
    bounds = np.flatnonzero(np.diff(xs) != 0) + 1
    for end in list(bounds) + [n]:
        ranks[order[start:end]] = 0.5 * (start + 1 + end)
        start = end
    return ranks


def binary_auc(positive, score) -> float:
    """ROC AUC = P(score_pos > score_neg) + 1/2 P(tie), via the Mann-Whitney rank sum; NaN (with a log
    message) when only one class is present."""
    pos = np.asarray(positive).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    if pos.shape != s.shape or pos.ndim != 1:
        raise ValueError(f"binary_auc: labels {pos.shape} and scores {s.shape} must be equal 1D arrays")
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        log.info("AUC undefined: only one class present among %d samples", pos.size)
        return float("nan")
    r = _average_ranks(s)
    return float((r[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def macro_ovr_auc(y_true, probs) -> float:
    """Binary (2 columns): AUC of class 1. More classes: mean one-vs-rest AUC over the classes that have
    both positives and negatives among ``y_true``.

    Args:
        y_true: (N,) class index.  probs: (N, C) class probabilities (or scores).
    """
    y = _labels(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != y.size:
        raise ValueError(f"probs: expected (N={y.size}, C), got {p.shape}")
    if p.shape[1] == 2:
        return binary_auc(y == 1, p[:, 1])
    aucs = [binary_auc(y == k, p[:, k]) for k in range(p.shape[1]) if 0 < np.sum(y == k) < y.size]
    return float(np.mean(aucs)) if aucs else float("nan")


def classification_metrics(y_true, probs) -> dict:
    """auc, acc, bacc, f1 from labels (N,) and probabilities (N, C); prediction = argmax."""
    p = np.asarray(probs, dtype=np.float64)
    y = _labels(y_true)
    if y.size == 0:
        return {"auc": float("nan"), "acc": float("nan"), "bacc": float("nan"), "f1": float("nan")}
    pred = p.argmax(axis=1)
    return {
        "auc": macro_ovr_auc(y, p),
        "acc": accuracy(y, pred),
        "bacc": balanced_accuracy(y, pred),
        "f1": macro_f1(y, pred, p.shape[1]),
    }


def c_index(time, risk, censorship) -> float:
    """Harrell's C-index (higher risk should mean shorter time; ties in risk count 1/2).

    Returns NaN, with a warning saying so, when no event is observed (lifelines raises ZeroDivisionError)
    or fewer than two patients are given.
    """
    from lifelines.utils import concordance_index

    t = np.asarray(time, dtype=np.float64)
    r = np.asarray(risk, dtype=np.float64)
    e = 1 - np.asarray(censorship).astype(np.int64)
    if not (t.shape == r.shape == e.shape) or t.ndim != 1:
        raise ValueError(f"c_index: time {t.shape}, risk {r.shape} and censorship {e.shape} must be equal 1D arrays")
    if t.size < 2:
        return float("nan")
    try:
        return float(concordance_index(t, -r, e))
    except ZeroDivisionError:
        log.warning("C-index undefined: no admissible pair (no event observed among %d patients)", t.size)
        return float("nan")


def km_risk_groups(time, risk, censorship) -> dict:
    """Split patients at the median predicted risk (above = high risk), fit Kaplan-Meier curves and test.

    Returns:
        {"p_value": log-rank p (NaN if a group is empty), "threshold": median risk,
         "high": bool array (N,), "curves": {"low": DataFrame, "high": DataFrame} of
         (timeline, survival) from lifelines}.
    """
    from lifelines import KaplanMeierFitter
    from lifelines.statistics import logrank_test

    t = np.asarray(time, dtype=np.float64)
    r = np.asarray(risk, dtype=np.float64)
    e = 1 - np.asarray(censorship).astype(np.int64)
    thr = float(np.median(r)) if r.size else float("nan")
    high = r > thr
    curves = {}
    for name, m in (("low", ~high), ("high", high)):
        if m.any():
            km = KaplanMeierFitter().fit(t[m], e[m], label=f"{name} risk")
            curves[name] = km.survival_function_.reset_index().set_axis(["time", "survival"], axis=1)
    if high.all() or not high.any():
        p = float("nan")
    else:
        p = float(logrank_test(t[high], t[~high], event_observed_A=e[high], event_observed_B=e[~high]).p_value)
    return {"p_value": p, "threshold": thr, "high": high, "curves": curves}


def plot_km(groups: dict, path: os.PathLike, title: str = "") -> Path:
    """Save the two Kaplan-Meier curves of :func:`km_risk_groups` as an image (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for name, color in (("low", "tab:blue"), ("high", "tab:red")):
        if name in groups["curves"]:
            c = groups["curves"][name]
            ax.step(c["time"], c["survival"], where="post", color=color, label=f"{name} risk")
    ax.set_xlabel("time")
    ax.set_ylabel("survival probability")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{title} log-rank p = {groups['p_value']:.3g}".strip())
    ax.legend()
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def survival_metrics(time, risk, censorship) -> dict:
    """cindex and the log-rank p-value of the median-split risk groups."""
    return {"cindex": c_index(time, risk, censorship),
            "logrank_p": km_risk_groups(time, risk, censorship)["p_value"] if len(time) >= 2 else float("nan")}


def summarize_folds(rows: Sequence[Mapping], group_keys: Sequence[str] = (), metric_keys: Optional[Sequence[str]] = None):
    """Mean and sample std (ddof = 1) of each metric over folds, per group.

    Args:
        rows: one mapping per fold, e.g. {"model": "abmil", "fold": 0, "test_auc": 0.8, ...}.
        group_keys: columns that define a group (e.g. ("cohort", "model")).
        metric_keys: numeric columns to summarise (default: every numeric column except group keys/"fold").
    Returns:
        pandas DataFrame: group keys, ``n_folds`` and ``<metric>_mean`` / ``<metric>_std`` columns.
    """
    import pandas as pd

    df = pd.DataFrame(list(rows))
    if metric_keys is None:
        skip = set(group_keys) | {"fold", "reported_epoch"}
        metric_keys = [c for c in df.columns if c not in skip and pd.api.types.is_numeric_dtype(df[c])]
    out = []
    groups = df.groupby(list(group_keys), sort=False) if group_keys else [((), df)]
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        rec = dict(zip(group_keys, key))
        rec["n_folds"] = len(g)
        for m in metric_keys:
            v = g[m].astype(float)
            rec[f"{m}_mean"] = float(v.mean())
            rec[f"{m}_std"] = float(v.std(ddof=1)) if v.notna().sum() > 1 else float("nan")
        out.append(rec)
    return pd.DataFrame(out)


def _fmt(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.3f} ± {std:.3f}" if not math.isnan(std) else f"{mean:.3f}"


def markdown_table(summary, group_keys: Sequence[str] = (), metric_keys: Optional[Sequence[str]] = None) -> str:
    """A Markdown table of ``mean ± std`` cells from :func:`summarize_folds`' output."""
    if metric_keys is None:
        metric_keys = [c[: -len("_mean")] for c in summary.columns if c.endswith("_mean")]
    head = list(group_keys) + ["folds"] + list(metric_keys)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in summary.iterrows():
        cells = [str(r[k]) for k in group_keys] + [str(int(r["n_folds"]))]
        cells += [_fmt(float(r[f"{m}_mean"]), float(r[f"{m}_std"])) for m in metric_keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _atomic_write_text(path: Path, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text)


def write_results_table(rows: Sequence[Mapping], out_dir: os.PathLike, *, group_keys: Sequence[str] = (),
                        metric_keys: Optional[Sequence[str]] = None, name: str = "results") -> tuple[Path, Path, str]:
    """Write ``<name>_folds.csv`` (one row per fold), ``<name>.csv`` (mean/std per group) and ``<name>.md``
    (mean ± std) into ``out_dir``. Returns the two summary paths and the Markdown text."""
    import pandas as pd

    out = Path(out_dir)
    summary = summarize_folds(rows, group_keys, metric_keys)
    _atomic_write_text(out / f"{name}_folds.csv", pd.DataFrame(list(rows)).to_csv(index=False))
    csv_path, md_path = out / f"{name}.csv", out / f"{name}.md"
    _atomic_write_text(csv_path, summary.to_csv(index=False))
    md = markdown_table(summary, group_keys, metric_keys)
    _atomic_write_text(md_path, md)
    return csv_path, md_path, md
