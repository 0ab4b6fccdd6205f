"""Label tables, patient-level splits and the bag dataset."""

from __future__ import annotations

from .dataset import BagDataset, Example, index_feature_files
from .labels import TASKS, LabelTable
from .splits import Split, make_splits, read_splits, write_splits

__all__ = [
    "BagDataset",
    "Example",
    "LabelTable",
    "Split",
    "TASKS",
    "index_feature_files",
    "make_splits",
    "read_splits",
    "write_splits",
]
