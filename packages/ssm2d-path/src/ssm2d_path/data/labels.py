"""Label tables: CLAM-style CSVs mapping slides to patients (cases) and to labels or survival.

Columns: ``case_id`` (patient) and ``slide_id`` (one row per slide; several slides may share a case),
plus ``label`` for classification, or a survival time and a censoring indicator for survival. The
censoring polarity is explicit: ``censorship_col`` (1 = censored, CLAM's convention) or ``event_col``
(1 = event observed, e.g. STAMP's ``status``), in which case ``censorship = 1 - event``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Optional, Union

import numpy as np
import pandas as pd

__all__ = ["LabelTable", "TASKS", "strip_slide_suffix"]

logger = logging.getLogger(__name__)

TASKS = ("classification", "survival")
# Tables often list the WSI file name; feature files are named by its stem.
_WSI_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".svslide", ".bif", ".czi", ".vms",
                 ".vmu", ".h5", ".pt")


def strip_slide_suffix(slide_id: str) -> str:
    """``"TCGA-XX.svs"`` -> ``"TCGA-XX"``: slide ids are matched to feature-file stems."""
    s = str(slide_id).strip()
    low = s.lower()
    for suf in _WSI_SUFFIXES:
        if low.endswith(suf):
            return s[: -len(suf)]
    return s


def _numeric_sort_key(values: list[str]):
    try:
        return sorted(values, key=float)
    except ValueError:
        return sorted(values)


class LabelTable:
    """Slides, their patients and their labels.

    Attributes:
        task: "classification" or "survival".
        df: normalised table, one row per slide, with string ``case_id`` and ``slide_id`` and
            classification: ``label`` (int class index) and ``label_name`` (str);
            survival: ``time`` (float), ``censorship`` (int, 1 = censored) and ``event`` (1 - censorship);
            the other columns of the source are kept.
        classes: class names in index order (classification; empty for survival).
        source: where the table came from.
    """

    def __init__(self, df: pd.DataFrame, task: str = "classification", *, label_col: str = "label",
                 time_col: str = "survival_months", censorship_col: str = "censorship",
                 event_col: Optional[str] = None, label_map: Optional[Mapping] = None, source: str = "<table>"):
        if task not in TASKS:
            raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
        self.task, self.source = task, source
        df = df.copy()
        df.columns = [str(c).strip() for c in df.columns]
        if "slide_id" not in df.columns and "case_id" not in df.columns:
            raise ValueError(f"{source}: needs a 'slide_id' and/or a 'case_id' column; found {list(df.columns)}")
        if "slide_id" not in df.columns:
            df["slide_id"] = df["case_id"]
        if "case_id" not in df.columns:
            logger.info("%s: no 'case_id' column; every slide is its own patient", source)
            df["case_id"] = df["slide_id"]
        for col in ("case_id", "slide_id"):
            if df[col].isna().any():
                rows = list(np.flatnonzero(df[col].isna().to_numpy())[:5])
                raise ValueError(f"{source}: empty {col!r} in rows {rows}")
        df["case_id"] = df["case_id"].astype(str).str.strip()
        df["slide_id"] = df["slide_id"].astype(str).map(strip_slide_suffix)
        dup = df["slide_id"][df["slide_id"].duplicated()].unique()
        if len(dup):
            raise ValueError(f"{source}: slide ids listed more than once: {list(dup[:5])}")
        self.classes: list[str] = []
        if task == "classification":
            df = self._classification(df, label_col, label_map)
            per_case = df.groupby("case_id", sort=False)["label"].nunique()
        else:
            df = self._survival(df, time_col, censorship_col, event_col)
            per_case = df.groupby("case_id", sort=False)[["time", "censorship"]].nunique().max(axis=1)
        bad = list(per_case.index[per_case > 1][:5])
        if bad:
            raise ValueError(f"{source}: the slides of a patient disagree on its label/survival: cases {bad}")
        self.df = df.reset_index(drop=True)
        self._case_slides: dict[str, list[str]] = {}
        for case, slide in zip(self.df["case_id"], self.df["slide_id"]):
            self._case_slides.setdefault(case, []).append(slide)
        self._slide_row = {s: i for i, s in enumerate(self.df["slide_id"])}
        self._case_row = {c: self._slide_row[s[0]] for c, s in self._case_slides.items()}

    def _classification(self, df: pd.DataFrame, label_col: str, label_map: Optional[Mapping]) -> pd.DataFrame:
        if label_col not in df.columns:
            raise ValueError(f"{self.source}: no label column {label_col!r}; found {list(df.columns)}")
        if df[label_col].isna().any():
            rows = list(np.flatnonzero(df[label_col].isna().to_numpy())[:5])
            raise ValueError(f"{self.source}: missing {label_col!r} in rows {rows}")
        raw = df[label_col].map(lambda v: str(int(v)) if isinstance(v, float) and float(v).is_integer() else str(v).strip())
        if label_map is not None:
            lm = {str(k).strip(): int(v) for k, v in label_map.items()}
            unknown = sorted(set(raw) - set(lm))
            if unknown:
                raise ValueError(f"{self.source}: labels {unknown} are not in label_map {sorted(lm)}")
            n = max(lm.values()) + 1
            names = [""] * n
            for k, v in lm.items():
                names[v] = names[v] + ("|" if names[v] else "") + k  # several raw labels may share one class
            self.classes = names
            idx = raw.map(lm)
        else:
            self.classes = _numeric_sort_key(sorted(set(raw)))
            lookup = {c: i for i, c in enumerate(self.classes)}
            idx = raw.map(lookup)
        out = df.drop(columns=[c for c in ("label", "label_name") if c in df.columns and c != label_col])
        out = out.drop(columns=[label_col])
        out["label"], out["label_name"] = idx.astype(int).to_numpy(), raw.to_numpy()
        logger.info("%s: %d classes %s", self.source, len(self.classes), self.classes)
        return out

    def _survival(self, df: pd.DataFrame, time_col: str, censorship_col: str, event_col: Optional[str]) -> pd.DataFrame:
        if time_col not in df.columns:
            raise ValueError(f"{self.source}: no survival time column {time_col!r}; found {list(df.columns)}")
        time = pd.to_numeric(df[time_col], errors="coerce")
        if time.isna().any() or (time < 0).any():
            rows = list(np.flatnonzero((time.isna() | (time < 0)).to_numpy())[:5])
            raise ValueError(f"{self.source}: {time_col!r} must be a non-negative number; bad rows {rows}")
        if event_col is not None:
            col, polarity = event_col, "event (1 = event observed); censorship = 1 - event"
        else:
            col, polarity = censorship_col, "censorship (1 = censored)"
        if col not in df.columns:
            hint = ("" if event_col is not None else
                    "; if your table has an event indicator (1 = event, e.g. STAMP's 'status'), pass event_col=")
            raise ValueError(f"{self.source}: no column {col!r}{hint}; found {list(df.columns)}")
        ind = pd.to_numeric(df[col], errors="coerce")
        if ind.isna().any() or not ind.isin([0, 1]).all():
            rows = list(np.flatnonzero((ind.isna() | ~ind.isin([0, 1])).to_numpy())[:5])
            raise ValueError(f"{self.source}: {col!r} must be 0 or 1; bad rows {rows}")
        ind = ind.astype(int)
        cens = 1 - ind if event_col is not None else ind
        logger.info("%s: survival time from %r, censoring read from %r as %s", self.source, time_col, col, polarity)
        out = df.drop(columns=[c for c in ("time", "censorship", "event") if c in df.columns])
        out["time"], out["censorship"], out["event"] = time.astype(float).to_numpy(), cens.to_numpy(), (1 - cens).to_numpy()
        return out

    @classmethod
    def read(cls, path: Union[str, Path], task: str = "classification", *, label_col: str = "label",
             time_col: str = "survival_months", censorship_col: str = "censorship", event_col: Optional[str] = None,
             label_map: Optional[Mapping] = None) -> "LabelTable":
        """Read a CSV (``.tsv``/``.txt`` tab-separated) label table; see the class docstring."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"label table {path}: no such file")
        sep = "\t" if path.suffix.lower() in (".tsv", ".txt") else ","
        try:
            df = pd.read_csv(path, sep=sep, dtype={"case_id": str, "slide_id": str})
        except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
            raise ValueError(f"label table {path}: cannot be parsed as {'TSV' if sep == chr(9) else 'CSV'}: {e}") from e
        df = df.drop(columns=[c for c in df.columns if str(c).startswith("Unnamed:")])
        return cls(df, task, label_col=label_col, time_col=time_col, censorship_col=censorship_col,
                   event_col=event_col, label_map=label_map, source=str(path))

    # ------------------------------------------------------------------------------------------

    def cases(self) -> list[str]:
        """Case (patient) ids in table order."""
        return list(self._case_slides)

    def slides(self) -> list[str]:
        """Slide ids in table order."""
        return list(self.df["slide_id"])

    def slides_of(self, case_id: str) -> list[str]:
        try:
            return list(self._case_slides[case_id])
        except KeyError:
            raise KeyError(f"case {case_id!r} is not in {self.source}") from None

    def case_of(self, slide_id: str) -> str:
        try:
            return str(self.df.at[self._slide_row[slide_id], "case_id"])
        except KeyError:
            raise KeyError(f"slide {slide_id!r} is not in {self.source}") from None

    def _row(self, bag_id: str, level: Optional[str] = None) -> int:
        if level not in (None, "patient", "slide"):
            raise ValueError(f"level: expected None, 'patient' or 'slide', got {level!r}")
        if level != "slide" and bag_id in self._case_row:
            return self._case_row[bag_id]
        if level != "patient" and bag_id in self._slide_row:
            return self._slide_row[bag_id]
        what = {"patient": "a case", "slide": "a slide"}.get(level, "a case or a slide")
        raise KeyError(f"{bag_id!r} is not {what} of {self.source}")

    def label_of(self, bag_id: str, *, level: Optional[str] = None) -> int:
        """Class index of a case or a slide (classification); ``level`` forces which one is meant."""
        if self.task != "classification":
            raise ValueError(f"label_of: the table is for {self.task}, not classification")
        return int(self.df.at[self._row(bag_id, level), "label"])

    def survival_of(self, bag_id: str, *, level: Optional[str] = None) -> tuple[float, int]:
        """(time, censorship) of a case or a slide, censorship 1 = censored (survival)."""
        if self.task != "survival":
            raise ValueError(f"survival_of: the table is for {self.task}, not survival")
        i = self._row(bag_id, level)
        return float(self.df.at[i, "time"]), int(self.df.at[i, "censorship"])

    def __len__(self) -> int:
        return len(self.df)

    def __repr__(self) -> str:
        extra = f", classes={self.classes}" if self.task == "classification" else ""
        return f"LabelTable({self.source!r}, task={self.task!r}, slides={len(self.df)}, cases={len(self._case_slides)}{extra})"
