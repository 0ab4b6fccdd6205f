"""`hatch version minor` in one package's folder changes that package's version and nothing else."""

from __future__ import annotations

import importlib
import re
import shutil
import sys
from pathlib import Path

import pytest

from _support import ROOT, run_checked

HATCH = Path(sys.executable).parent / "hatch"


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("dist,module", [("ssm2d-nn", "ssm2d_nn"), ("ssm2d-vision", "ssm2d_vision"),
                                         ("ssm2d-path", "ssm2d_path")])
def test_hatch_version_minor_touches_one_package(tmp_path, dist, module):
    if not HATCH.exists():
        pytest.fail(f"hatch is part of the development environment but {HATCH} is missing")
    work = tmp_path / "repo"
    shutil.copytree(ROOT / "packages", work / "packages",
                    ignore=shutil.ignore_patterns("build", "__pycache__", "*.so", "*.egg-info"))
    shutil.copy(ROOT / "pyproject.toml", work / "pyproject.toml")
    before = _snapshot(work)
    old = importlib.import_module(module).__version__
    major, minor, _ = (int(x) for x in re.match(r"(\d+)\.(\d+)\.(\d+)", old).groups())
    run_checked([HATCH, "version", "minor"], cwd=work / "packages" / dist)
    after = _snapshot(work)
    changed = sorted(k for k in after if before.get(k) != after[k]) + sorted(set(before) - set(after))
    about = f"packages/{dist}/src/{module}/__about__.py"
    assert changed == [about]
    assert after[about].decode().strip() == f'__version__ = "{major}.{minor + 1}.0"'
