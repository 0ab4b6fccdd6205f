"""Label tables, patient-level splits and the bag dataset."""

from __future__ import annotations

from .dataset import BagDataset, CohortError, Example, index_feature_files
from .labels import TASKS, LabelTable
from .splits import Split, check_splits, make_splits, read_splits, split_files, write_splits

__all__ = [
    "BagDataset",
    "CohortError",
    "Example",
    "LabelTable",
    "Split",
    "check_splits",
    "TASKS",
    "index_feature_files",
    "make_splits",
    "read_splits",
    "split_files",
    "write_splits",
]
