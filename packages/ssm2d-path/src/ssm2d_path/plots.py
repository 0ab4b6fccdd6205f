"""Figures of a cross-validation run: Kaplan-Meier curves of the predicted risk groups and ROC curves.

Both pool the test predictions of every fold (``fold_<i>/predictions_test.csv``), each bag predicted by
the model of the fold that held it out:

* :func:`plot_km_groups` (survival): each fold's test patients are split at **that fold's** median
  predicted risk (a threshold that uses no other fold's predictions), the low/high groups are pooled, and
  their Kaplan-Meier curves (95 % confidence bands, censoring ticks, numbers at risk) are drawn with
  the log-rank p-value of the pooled groups;
* :func:`plot_roc` (classification): one-vs-rest ROC curves per class (binary: the positive class) of the
  pooled predictions with their AUC, and the per-fold AUC as mean +- std in the title.

:func:`plot_run` finds the predictions in a run folder, tells the task from their columns and writes
``km_risk_groups.png`` or ``roc.png``. Every file is a PNG written atomically (dpi 300, matplotlib Agg).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

__all__ = ["load_run_predictions", "plot_km_groups", "plot_roc", "plot_run", "roc_curve", "split_by_fold_median",
           "trapezoid_auc"]

PathLike = Union[str, os.PathLike]
DPI = 300
LOW, HIGH = "#1f77b4", "#d62728"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: PathLike) -> Path:
    from ssm2d_nn.fileio import atomic_output

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png", bbox_inches="tight")
    _plt().close(fig)
    return path


# ------------------------------------------------------------------------------------------------ data

def load_run_predictions(run_dir: PathLike, part: str = "test"):
    """Concatenate ``<run_dir>/fold_<i>/predictions_<part>.csv`` with a ``fold`` column (folds in
    numeric order). Raises FileNotFoundError naming the folder when there is none."""
    import pandas as pd

    run_dir = Path(run_dir)
    files = sorted(run_dir.glob(f"fold_*/predictions_{part}.csv"),
                   key=lambda p: int(p.parent.name.split("_")[-1]) if p.parent.name.split("_")[-1].isdigit() else 0)
    if not files:
        raise FileNotFoundError(f"run: no fold_*/predictions_{part}.csv in {run_dir}")
    parts = []
    for f in files:
        df = pd.read_csv(f)
        df.insert(0, "fold", int(f.parent.name.split("_")[-1]))
        parts.append(df)
    return pd.concat(parts, ignore_index=True)


def _check_columns(df, cols: Sequence[str], what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"pred_df: {what} needs the column(s) {', '.join(missing)}; found {list(df.columns)}")


# ------------------------------------------------------------------------------------------------ survival

def split_by_fold_median(pred_df) -> np.ndarray:
    """(N,) bool, True = high risk: ``risk > median`` of the bag's own fold (all rows one fold when there
    is no ``fold`` column), as :func:`ssm2d_path.metrics.km_risk_groups` splits one fold."""
    from .metrics import km_risk_groups

    _check_columns(pred_df, ["time", "risk", "censorship"], "a Kaplan-Meier plot")
    high = np.zeros(len(pred_df), bool)
    folds = pred_df["fold"].to_numpy() if "fold" in pred_df.columns else np.zeros(len(pred_df), int)
    for f in np.unique(folds):
        m = folds == f
        sub = pred_df[m]
        high[m] = km_risk_groups(sub["time"].to_numpy(), sub["risk"].to_numpy(), sub["censorship"].to_numpy())["high"]
    return high


def plot_km_groups(pred_df, path: PathLike, *, title: str = "", time_unit: str = "months") -> Path:
    """Kaplan-Meier curves of the low/high predicted-risk groups (each fold split at its own median risk).

    Args:
        pred_df: test predictions with columns ``time``, ``censorship`` (1 = censored), ``risk`` and
            optionally ``fold``.
        path: PNG file.
    Returns:
        path. The figure: both curves with 95 % confidence bands and censoring ticks, the pooled log-rank
        p-value, a number-at-risk table under the axis.
    """
    from lifelines import KaplanMeierFitter
    from lifelines.plotting import add_at_risk_counts
    from lifelines.statistics import logrank_test

    plt = _plt()
    high = split_by_fold_median(pred_df)
    t = pred_df["time"].to_numpy(np.float64)
    e = 1 - pred_df["censorship"].to_numpy().astype(np.int64)
    n_folds = pred_df["fold"].nunique() if "fold" in pred_df.columns else 1
    if high.all() or not high.any():
        p = float("nan")
    else:
        p = float(logrank_test(t[high], t[~high], event_observed_A=e[high], event_observed_B=e[~high]).p_value)
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    fitters, handles, labels = [], [], []
    for name, m, colour in (("Low risk", ~high, LOW), ("High risk", high, HIGH)):
        if not m.any():
            continue
        km = KaplanMeierFitter().fit(t[m], e[m], label=name)
        km.plot_survival_function(ax=ax, ci_show=True, ci_alpha=0.15, show_censors=True, color=colour,
                                  censor_styles={"marker": "|", "ms": 6, "mew": 1.0}, linewidth=1.6)
        fitters.append(km)
        handles.append(ax.lines[-1] if not ax.lines[-1].get_label().startswith("_") else
                       next(ln for ln in ax.lines[::-1] if ln.get_label() == name))
        labels.append(f"{name} (n = {int(m.sum())}, {int(e[m].sum())} events)")
    ptxt = "n/a" if p != p else (f"{p:.2e}" if p < 1e-3 else f"{p:.3f}")
    ax.set_ylim(0, 1.03)
    ax.set_xlim(left=0)
    ax.set_xlabel(f"Time ({time_unit})" if time_unit else "Time")
    ax.set_ylabel("Survival probability")
    ax.spines[["top", "right"]].set_visible(False)
    leg = ax.legend([h for h in handles], labels, loc="upper right", frameon=False, fontsize=8,
                    title=f"log-rank p = {ptxt}", title_fontsize=8.5)
    leg._legend_box.align = "right"
    split = (f"groups split at each fold's median predicted risk, test sets of {n_folds} folds pooled"
             if n_folds > 1 else "groups split at the median predicted risk")
    ax.set_title((f"{title}\n" if title else "") + split, fontsize=9.5)
    if fitters:
        add_at_risk_counts(*fitters, ax=ax, rows_to_show=["At risk"], fig=fig)
    fig.tight_layout()
    return _save(fig, path)


# ------------------------------------------------------------------------------------------------ ROC

def roc_curve(positive, score) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points of a binary problem.

    Args:
        positive: (N,) bool (or 0/1), score: (N,) higher = more positive.
    Returns:
        fpr, tpr (M + 1,) from (0, 0) to (1, 1), and thresholds (M + 1,) (the first +inf): the point k
        classifies ``score >= thresholds[k]`` as positive, one point per distinct score (ties move
        diagonally, which makes the trapezoid area the Mann-Whitney AUC with ties counted 1/2).
    Raises:
        ValueError when the shapes differ or a class is absent.
    """
    pos = np.asarray(positive).astype(bool).reshape(-1)
    s = np.asarray(score, dtype=np.float64).reshape(-1)
    if pos.shape != s.shape:
        raise ValueError(f"roc_curve: labels {pos.shape} and scores {s.shape} differ")
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"roc_curve: needs both classes ({n_pos} positive, {n_neg} negative)")
    order = np.argsort(-s, kind="mergesort")
    s, pos = s[order], pos[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]  # last index of each distinct score
    tp = np.cumsum(pos)[last]
    fp = np.cumsum(~pos)[last]
    fpr = np.r_[0.0, fp / n_neg]
    tpr = np.r_[0.0, tp / n_pos]
    return fpr, tpr, np.r_[np.inf, s[last]]


def trapezoid_auc(fpr, tpr) -> float:
    """Area under the ROC points (trapezoid rule)."""
    x, y = np.asarray(fpr, np.float64), np.asarray(tpr, np.float64)
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def _class_columns(df) -> list[str]:
    cols = sorted((c for c in df.columns if c.startswith("prob_") and c[5:].isdigit()), key=lambda c: int(c[5:]))
    if len(cols) < 2:
        raise ValueError(f"pred_df: a ROC plot needs prob_0..prob_<C-1> columns; found {list(df.columns)}")
    return cols


def plot_roc(pred_df, path: PathLike, *, classes: Optional[Sequence[str]] = None, title: str = "") -> Path:
    """ROC curves of pooled test predictions with AUCs; the per-fold AUC (mean +- std) in the title.

    Args:
        pred_df: predictions with ``label`` (class index), ``prob_0..prob_{C-1}`` and optionally ``fold``.
        classes: class names (default "class <i>").
    """
    from .metrics import macro_ovr_auc

    plt = _plt()
    _check_columns(pred_df, ["label"], "a ROC plot")
    cols = _class_columns(pred_df)
    n = len(cols)
    classes = list(classes) if classes is not None else [str(i) for i in range(n)]
    if len(classes) != n:
        raise ValueError(f"classes: {len(classes)} names for {n} probability columns")
    y = pred_df["label"].to_numpy().astype(np.int64)
    probs = pred_df[cols].to_numpy(np.float64)
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="0.6", label="Chance")
    shown = [1] if n == 2 else range(n)
    palette = plt.get_cmap("tab10")
    for j, k in enumerate(shown):
        pos = y == k
        if not 0 < pos.sum() < y.size:
            continue
        fpr, tpr, _ = roc_curve(pos, probs[:, k])
        cname = f"class {classes[k]}" if str(classes[k]).isdigit() else str(classes[k])
        name = f"{cname} (positive)" if n == 2 else f"{cname} vs rest"
        ax.plot(fpr, tpr, lw=1.6, color=palette(j % 10), drawstyle="default",
                label=f"{name}: AUC = {trapezoid_auc(fpr, tpr):.3f}")
    folds = pred_df["fold"].to_numpy() if "fold" in pred_df.columns else np.zeros(len(y), int)
    aucs = [macro_ovr_auc(y[folds == f], probs[folds == f]) for f in np.unique(folds)]
    aucs = [a for a in aucs if a == a]
    kind = "AUC" if n == 2 else "macro one-vs-rest AUC"
    if len(aucs) > 1:
        sub = f"per-fold {kind} {np.mean(aucs):.3f} \u00b1 {np.std(aucs, ddof=1):.3f} ({len(aucs)} folds); curves pooled"
    elif aucs:
        sub = f"{kind} {aucs[0]:.3f}"
    else:
        sub = f"{kind} undefined (one class only)"
    ax.set_title((f"{title}\n" if title else "") + sub, fontsize=9.5)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("False positive rate (1 \u2212 specificity)")
    ax.set_ylabel("True positive rate (sensitivity)")
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(loc="lower right", frameon=False, fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


# ------------------------------------------------------------------------------------------------ runs

def _run_classes(run_dir: Path, n: int) -> Optional[list[str]]:
    for card in sorted(run_dir.glob("fold_*/model.json")):
        try:
            classes = json.loads(card.read_text()).get("classes")
        except (OSError, json.JSONDecodeError):
            continue
        if classes and len(classes) == n:
            return [str(c) for c in classes]
    return None


def _run_title(run_dir: Path) -> str:
    for card in sorted(run_dir.glob("fold_*/model.json")):
        try:
            return json.loads(card.read_text()).get("name") or run_dir.name
        except (OSError, json.JSONDecodeError):
            continue
    return run_dir.name


def plot_run(run_dir: PathLike, out_dir: Optional[PathLike] = None) -> list[Path]:
    """The figures of a cross-validation run (``fold_*/predictions_test.csv``): ``km_risk_groups.png``
    for survival (a ``risk`` column), ``roc.png`` for classification (``label`` and ``prob_*``), written to
    ``out_dir`` (default the run folder). A folder without folds whose sub-folders are runs (e.g. the demo's
    ``<cohort>/`` with one run per model) gets ``<out_dir>/<model>_<figure>.png`` per run.

    Raises:
        FileNotFoundError when no predictions are found; ValueError when their columns fit neither task.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run: {run_dir} is not a folder")
    if not any(run_dir.glob("fold_*/predictions_test.csv")):
        subs = sorted(d for d in run_dir.iterdir() if d.is_dir() and any(d.glob("fold_*/predictions_test.csv")))
        if not subs:
            raise FileNotFoundError(f"run: no fold_*/predictions_test.csv in {run_dir} or its sub-folders")
        out = []
        for d in subs:
            out += _plot_one(d, Path(out_dir) if out_dir else run_dir, prefix=f"{d.name}_")
        return out
    return _plot_one(run_dir, Path(out_dir) if out_dir else run_dir)


def _plot_one(run_dir: Path, out_dir: Path, prefix: str = "") -> list[Path]:
    df = load_run_predictions(run_dir)
    title = _run_title(run_dir)
    if "risk" in df.columns:
        return [plot_km_groups(df, out_dir / f"{prefix}km_risk_groups.png", title=title)]
    if "label" in df.columns and any(c.startswith("prob_") for c in df.columns):
        n = len(_class_columns(df))
        return [plot_roc(df, out_dir / f"{prefix}roc.png", classes=_run_classes(run_dir, n), title=title)]
    raise ValueError(f"run {run_dir}: predictions have neither 'risk' (survival) nor 'label' + 'prob_*' "
                     f"(classification) columns: {list(df.columns)}")
