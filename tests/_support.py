"""Helpers shared by the integration tests (importable: tests/ is on pytest's pythonpath)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def nvcc_available() -> bool:
    return shutil.which("nvcc") is not None


def run_checked(cmd, **kw) -> subprocess.CompletedProcess:
    """Runs a command, failing the test with its output when it fails."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        pytest.fail(f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n"
                    f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc
