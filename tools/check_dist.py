#!/usr/bin/env python3
"""Checks the wheels and sdists in a dist folder: one wheel and one sdist per package, versions equal
to each package's __about__.py, and the dependencies each package must declare.

    python tools/check_dist.py dist/
"""

from __future__ import annotations

import email.parser
import re
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXPECTED_DEPENDENCIES = {
    "ssm2d-kernels": set(),
    "ssm2d-nn": {"torch", "ssm2d-kernels"},
    "ssm2d-vision": {"torch", "ssm2d-nn", "timm"},
    "ssm2d-path": {"torch", "ssm2d-nn", "lifelines", "h5py"},
}


def about_version(dist: str) -> str:
    module = dist.replace("-", "_")
    text = (ROOT / "packages" / dist / "src" / module / "__about__.py").read_text()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


def wheel_metadata(path: Path):
    with zipfile.ZipFile(path) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(zf.read(name).decode())


def main(folder: str) -> int:
    out = Path(folder)
    problems = []
    for dist, needed in EXPECTED_DEPENDENCIES.items():
        stem = dist.replace("-", "_")
        wheels = list(out.glob(f"{stem}-*.whl"))
        sdists = list(out.glob(f"{stem}-*.tar.gz"))
        if len(wheels) != 1 or len(sdists) != 1:
            problems.append(f"{dist}: expected one wheel and one sdist in {out}, found {wheels + sdists}")
            continue
        meta = wheel_metadata(wheels[0])
        version = about_version(dist)
        if meta["Version"] != version:
            problems.append(f"{dist}: wheel version {meta['Version']} != __about__ {version}")
        if not sdists[0].name.startswith(f"{stem}-{version}.tar.gz"):
            problems.append(f"{dist}: sdist {sdists[0].name} does not carry version {version}")
        with tarfile.open(sdists[0]) as tf:
            if not any(n.endswith("/pyproject.toml") for n in tf.getnames()):
                problems.append(f"{dist}: sdist has no pyproject.toml")
        declared = {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower()
                    for r in (meta.get_all("Requires-Dist") or []) if "extra ==" not in r}
        if needed - declared or (not needed and declared):
            problems.append(f"{dist}: declares {sorted(declared)}, must declare {sorted(needed)}")
        print(f"{dist:<14} {version:<8} {wheels[0].name}  requires: {', '.join(sorted(declared)) or '-'}")
    for p in problems:
        print("PROBLEM:", p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(main(sys.argv[1]))
