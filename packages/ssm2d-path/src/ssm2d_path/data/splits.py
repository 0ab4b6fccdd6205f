"""Patient-level stratified k-fold splits, and CLAM's ``splits_{i}.csv`` files.

Every patient falls in the test part of exactly one fold; within a fold, the validation part is drawn
from the training patients with the same stratification; a patient's slides never straddle two parts.
Classification stratifies by label; survival by (event indicator, time quantile bin).

A split folder holds the files of one k: :func:`write_splits` refuses a folder that already holds split
files unless ``overwrite`` (then the old ones, stale higher folds included, are removed first);
:func:`read_splits` with ``k`` requires exactly ``splits_0 .. splits_{k-1}``, and :func:`check_splits`
that every patient is in exactly one test fold.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import pandas as pd

from .labels import LabelTable
from ssm2d_nn.fileio import atomic_output

__all__ = ["Split", "check_splits", "make_splits", "read_splits", "split_files", "write_splits"]

logger = logging.getLogger(__name__)

_SPLIT_FILE = re.compile(r"^splits_(\d+)\.csv$")
# Ours, and CLAM's companions splits_<i>_bool.csv / splits_<i>_descriptor.csv.
_ANY_SPLIT_FILE = re.compile(r"^splits_(\d+)(_bool|_descriptor)?\.csv$")


@dataclass
class Split:
    """Bag ids (case ids at patient level, slide ids at slide level) of one fold."""

    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)

    def parts(self) -> dict[str, list[str]]:
        return {"train": self.train, "val": self.val, "test": self.test}


def _survival_strata(table: LabelTable, cases: list[str], k: int) -> dict[str, tuple]:
    times = np.array([table.survival_of(c, level="patient")[0] for c in cases])
    events = np.array([1 - table.survival_of(c, level="patient")[1] for c in cases])
    for n_bins in (4, 3, 2, 1):
        edges = np.quantile(times, np.linspace(0, 1, n_bins + 1)[1:-1]) if n_bins > 1 else np.array([])
        bins = np.searchsorted(edges, times, side="right")
        keys = [(int(e), int(b)) for e, b in zip(events, bins)]
        counts = pd.Series(keys).value_counts()
        if counts.min() >= k:
            if n_bins < 4:
                logger.info("survival splits: %d time bin(s) so that every (event, time bin) stratum has >= %d patients", n_bins, k)
            return dict(zip(cases, keys))
    logger.warning("survival splits: fewer than k=%d censored or uncensored patients; splits stratify by nothing", k)
    return {c: (0, 0) for c in cases}


def _strata(table: LabelTable, cases: list[str], k: int) -> dict[str, tuple]:
    if table.task == "survival":
        return _survival_strata(table, cases, k)
    labels = {c: table.label_of(c, level="patient") for c in cases}
    counts = pd.Series(list(labels.values())).value_counts()
    small = {table.classes[i]: int(n) for i, n in counts.items() if n < k}
    if small:
        raise ValueError(f"make_splits: classes with fewer patients than k={k} folds: {small}; "
                         f"lower k or merge those classes")
    return {c: (v,) for c, v in labels.items()}


def _pick_val(train: list[str], strata: dict[str, tuple], val_fraction: float, rng: np.random.Generator) -> set[str]:
    """Stratified draw of round(val_fraction * len(train)) patients (largest-remainder per stratum)."""
    total = int(round(val_fraction * len(train)))
    if total == 0:
        return set()
    groups: dict[tuple, list[str]] = {}
    for c in train:
        groups.setdefault(strata[c], []).append(c)
    keys = sorted(groups)
    exact = np.array([val_fraction * len(groups[g]) for g in keys])
    cap = np.array([max(len(groups[g]) - 1, 0) for g in keys])  # keep every stratum in training
    quota = np.minimum(np.floor(exact).astype(int), cap)
    order = np.argsort(-(exact - np.floor(exact)), kind="stable")
    for i in order:
        if quota.sum() >= total:
            break
        if quota[i] < cap[i]:
            quota[i] += 1
    val: set[str] = set()
    for g, q in zip(keys, quota):
        members = sorted(groups[g])
        val.update(members[j] for j in rng.permutation(len(members))[:q])
    return val


def make_splits(table: LabelTable, k: int = 5, *, seed: int = 0, val_fraction: float = 0.15,
                level: str = "patient") -> list[Split]:
    """k stratified folds over patients.

    Args:
        table: the label table.
        k: number of folds (>= 2); every class needs >= k patients (classification).
        seed: the only source of randomness; equal seeds give equal splits.
        val_fraction: share of each fold's training patients moved to validation (0 for none).
        level: "patient" (bag ids are case ids) or "slide" (slide ids; patients still never straddle parts).
    Returns:
        k Splits; fold i's test part is the i-th fold; ids sorted within each part.
    """
    if k < 2:
        raise ValueError(f"k: need at least 2 folds, got {k}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction: expected 0 <= val_fraction < 1, got {val_fraction}")
    if level not in ("patient", "slide"):
        raise ValueError(f"level: expected 'patient' or 'slide', got {level!r}")
    cases = table.cases()
    if len(cases) < k:
        raise ValueError(f"make_splits: {len(cases)} patients cannot fill k={k} test folds")
    strata = _strata(table, cases, k)
    rng = np.random.default_rng(seed)
    fold_of: dict[str, int] = {}
    offset = 0
    for key in sorted(set(strata.values())):
        members = sorted(c for c in cases if strata[c] == key)
        for j, idx in enumerate(rng.permutation(len(members))):
            fold_of[members[idx]] = (offset + j) % k  # round robin: per-fold counts differ by at most 1
        offset = (offset + len(members)) % k
    splits = []
    for i in range(k):
        test = sorted(c for c in cases if fold_of[c] == i)
        train_pool = sorted(c for c in cases if fold_of[c] != i)
        val = _pick_val(train_pool, strata, val_fraction, np.random.default_rng([seed, i]))
        train = [c for c in train_pool if c not in val]
        parts = [train, sorted(val), test]
        if level == "slide":
            parts = [sorted(s for c in p for s in table.slides_of(c)) for p in parts]
        splits.append(Split(*parts))
    return splits


def _atomic_write_text(path: Path, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="")


def split_files(directory: Union[str, Path]) -> list[Path]:
    """The ``splits_<i>.csv`` files of a folder, in order of i (none when it does not exist)."""
    p = Path(directory)
    if not p.is_dir():
        return []
    found = []
    for f in p.iterdir():
        m = _SPLIT_FILE.match(f.name)
        if m:
            found.append((int(m.group(1)), f))
    return [f for _, f in sorted(found, key=lambda t: t[0])]


def write_splits(directory: Union[str, Path], splits: list[Split], *, overwrite: bool = False) -> list[Path]:
    """Write ``splits_{i}.csv`` (columns train,val,test; ragged columns padded with empty cells).

    A folder holds the splits of one k: when it already holds split files, FileExistsError is raised
    unless ``overwrite``; then every old split file (``splits_<i>.csv`` and CLAM's ``_bool`` /
    ``_descriptor`` companions) is removed before the new ones are written.
    Returns the written paths. Each file is written atomically.
    """
    directory = Path(directory)
    old = sorted(f for f in directory.iterdir() if _ANY_SPLIT_FILE.match(f.name)) if directory.is_dir() else []
    if old and not overwrite:
        raise FileExistsError(f"splits: {directory} already holds {len(split_files(directory)) or len(old)} split "
                              f"file(s) ({', '.join(f.name for f in old[:6])}{' ...' if len(old) > 6 else ''}); "
                              f"pass --overwrite (overwrite=True) to replace them, or choose another folder")
    for f in old:
        f.unlink()
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, s in enumerate(splits):
        cols = [s.train, s.val, s.test]
        n = max(len(c) for c in cols)
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["train", "val", "test"])
        for r in range(n):
            w.writerow([c[r] if r < len(c) else "" for c in cols])
        path = directory / f"splits_{i}.csv"
        _atomic_write_text(path, buf.getvalue())
        paths.append(path)
    return paths


def _read_split_file(path: Path) -> Split:
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ValueError(f"split file {path}: cannot be parsed as CSV: {e}") from e
    # CLAM writes pandas' index as a first, unnamed column.
    df = df.drop(columns=[c for c in df.columns if not str(c).strip() or str(c).startswith("Unnamed:")])
    df.columns = [str(c).strip().lower() for c in df.columns]
    missing = [c for c in ("train", "val") if c not in df.columns]
    if missing:
        raise ValueError(f"split file {path}: missing column(s) {missing}; found {list(df.columns)}")
    parts = {}
    for col in ("train", "val", "test"):
        vals = [str(v).strip() for v in df[col]] if col in df.columns else []
        parts[col] = [v for v in vals if v]
    seen: dict[str, str] = {}
    for col, ids in parts.items():
        for x in ids:
            if x in seen and seen[x] != col:
                raise ValueError(f"split file {path}: id {x!r} is in both {seen[x]!r} and {col!r}")
            seen[x] = col
    return Split(parts["train"], parts["val"], parts["test"])


def read_splits(dir_or_file: Union[str, Path], k: Optional[int] = None) -> list[Split]:
    """Read one split file, or every ``splits_{i}.csv`` of a folder in order of i.

    Reads ours and CLAM's (which adds an unnamed index column; its ``splits_{i}_bool.csv`` and
    ``_descriptor.csv`` companions are ignored). With ``k`` the folder must hold exactly
    ``splits_0.csv .. splits_{k-1}.csv`` (ValueError naming what it holds otherwise).
    """
    p = Path(dir_or_file)
    if p.is_file():
        return [_read_split_file(p)]
    if not p.is_dir():
        raise FileNotFoundError(f"splits: {p} is neither a split file nor a folder")
    files = sorted(((int(m.group(1)), f) for f in p.iterdir() if (m := _SPLIT_FILE.match(f.name))), key=lambda t: t[0])
    if not files:
        raise FileNotFoundError(f"splits: no splits_{{i}}.csv files in {p}")
    idx = [i for i, _ in files]
    if k is not None and idx != list(range(k)):
        raise ValueError(f"splits: {p} holds {len(idx)} split file(s) (splits_{{{','.join(map(str, idx))}}}.csv) but "
                         f"data.k = {k} needs splits_0 .. splits_{k - 1}; set data.k to match, or rewrite the "
                         f"folder (ssm2d-path splits --k {k} --overwrite)")
    if idx != list(range(len(idx))):
        logger.warning("splits in %s are numbered %s, not 0..%d", p, idx, len(idx) - 1)
    return [_read_split_file(f) for _, f in files]


def check_splits(splits: list[Split], table: LabelTable, *, level: str = "patient", where: str = "splits",
                 ids: Optional[list[str]] = None) -> None:
    """Every patient is in the test part of exactly one fold, and a patient's slides never straddle
    the parts of a fold.

    Args:
        splits: the folds.  table: the label table (maps slide ids to patients).
        level: "patient" (ids are case ids) or "slide" (slide ids).
        ids: the bags that must be tested (default: every bag of the table at ``level``).
    Raises:
        ValueError naming the patients tested twice (and in which folds) or never.
    """
    def case(i: str) -> str:
        if level == "patient":
            return i
        try:
            return table.case_of(i)
        except (KeyError, ValueError):
            return i

    folds_of: dict[str, set] = {}
    for f, s in enumerate(splits):
        parts_of: dict[str, set] = {}
        for part, members in s.parts().items():
            for i in members:
                parts_of.setdefault(case(i), set()).add(part)
        straddle = sorted(c for c, parts in parts_of.items() if len(parts) > 1)
        if straddle:
            raise ValueError(f"{where}: fold {f}: patient(s) in more than one of train/val/test: "
                             f"{', '.join(straddle[:10])}{' ...' if len(straddle) > 10 else ''}")
        for i in s.test:
            folds_of.setdefault(case(i), set()).add(f)
    twice = {c: sorted(fs) for c, fs in folds_of.items() if len(fs) > 1}
    if twice:
        items = sorted(twice.items())
        raise ValueError(f"{where}: {len(twice)} patient(s) are in the test part of more than one fold "
                         f"(each must be tested exactly once): "
                         + ", ".join(f"{c} in folds {fs}" for c, fs in items[:10]) + (" ..." if len(items) > 10 else ""))
    want = [case(i) for i in ids] if ids is not None else list(table.cases())
    never = sorted(set(want) - set(folds_of))
    if never:
        raise ValueError(f"{where}: {len(never)} patient(s) are in no fold's test part (each must be tested "
                         f"exactly once): {', '.join(never[:10])}{' ...' if len(never) > 10 else ''}")
