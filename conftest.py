"""The GPU skip rule of the whole suite (this file sits at the root so every test folder gets it)."""

from __future__ import annotations

import pytest


def cuda_devices() -> int:
    """Usable CUDA devices as torch sees them (0 where torch is CPU-only or absent)."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pytest_collection_modifyitems(config, items):
    if cuda_devices() > 0:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on a GPU machine: tools/dev.py test -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
