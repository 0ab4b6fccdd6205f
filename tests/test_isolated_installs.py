"""Each package installs alone into a fresh virtual environment with only what it declares.

These tests build real wheels and real virtual environments (a few minutes): they are what a user
running `pip install ssm2d-<x>` gets. The kernel wheel is built from a copy of its source folder,
exactly as `pip install packages/ssm2d-kernels` does (isolated build, no torch anywhere).
"""

from __future__ import annotations

import email.parser
import os
import shutil
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from _support import ROOT, run_checked

pytestmark = pytest.mark.slow
CONSTRAINTS = ROOT / "tools" / "constraints.txt"
PURE = ["ssm2d-nn", "ssm2d-vision", "ssm2d-path"]


def _fresh_venv(path: Path) -> Path:
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    return path / "bin" / "python"


def _pip(py: Path, *args, **kw):
    return run_checked([py, "-m", "pip", "--disable-pip-version-check", *args], **kw)


def _copy_source(package: str, dest: Path) -> Path:
    target = dest / package
    shutil.copytree(ROOT / "packages" / package, target,
                    ignore=shutil.ignore_patterns("build", "__pycache__", "*.egg-info", "*.so"))
    return target


def _wheel_metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(zf.read(name).decode())


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    """Wheels of the three pure packages (pip wheel, as a user would) and a CPU-only kernel wheel."""
    out = tmp_path_factory.mktemp("wheels")
    src = tmp_path_factory.mktemp("src")
    for package in PURE:
        _pip(Path(sys.executable), "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", out,
             _copy_source(package, src))
    env = {**os.environ, "SSM2D_WITH_CUDA": "OFF"}
    _pip(Path(sys.executable), "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", out,
         _copy_source("ssm2d-kernels", src), env=env)
    return out


def _wheel(wheelhouse: Path, dist: str) -> Path:
    (path,) = wheelhouse.glob(dist.replace("-", "_") + "-*.whl")
    return path


@pytest.mark.parametrize("dist", PURE)
def test_wheel_metadata_names_version_and_dependencies(wheelhouse, dist):
    import importlib.metadata as md

    meta = _wheel_metadata(_wheel(wheelhouse, dist))
    assert meta["Name"] == dist
    assert meta["Version"] == md.version(dist)
    assert sorted(meta.get_all("Requires-Dist")) == sorted(md.requires(dist))
    assert meta["License-Expression"] == "Apache-2.0"


def test_kernel_wheel_alone_from_source_without_torch(tmp_path):
    py = _fresh_venv(tmp_path / "venv")
    # CPU kernels only: what this test shows is that the package builds and installs from source on its
    # own, without torch. Compiling the CUDA kernels a second time would add ~9 minutes on a 2-core CI
    # machine; the development build compiles them (SSM2D_WITH_CUDA=ON wherever nvcc is, so a kernel that
    # does not compile fails the setup) and test_kernels_in_env.py checks that it did.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSM2D_")}
    env["SSM2D_WITH_CUDA"] = "OFF"
    _pip(py, "install", "-q", _copy_source("ssm2d-kernels", tmp_path), env=env)
    code = (
        "import importlib.util, json, ssm2d_kernels as k\n"
        "assert importlib.util.find_spec('torch') is None, 'torch must not be installed'\n"
        "info = k.build_info(); info['devices'] = k.cuda_device_count(); info['cpu'] = k.cpu_selftest()['ok']\n"
        "print(json.dumps(info))\n"
    )
    import json

    info = json.loads(run_checked([py, "-c", code]).stdout)
    assert info["cpu"] is True
    assert info["cuda"] is False
    assert info["devices"] >= 0
    listed = run_checked([py, "-m", "pip", "list", "--format=freeze"]).stdout.lower()
    assert "ssm2d-kernels==" in listed and "torch" not in listed


_CHECKS = {
    "ssm2d-nn": (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import ssm2d_nn, torch\n"
        "assert not [x for x in w if x.category is ssm2d_nn.KernelsUnavailableWarning], w\n"
        "assert ssm2d_nn.kernels_status().available\n"
        "assert ssm2d_nn.resolve_backend('x', 'kernel', torch.device('cpu')) == 'kernel'\n"
        "import importlib.util\n"
        "assert importlib.util.find_spec('timm') is None and importlib.util.find_spec('ssm2d_path') is None\n"
    ),
    "ssm2d-vision": (
        "import ssm2d_vision, timm, torch\n"
        "m = timm.create_model('resnet10t', num_classes=3)\n"
        "assert m(torch.randn(1, 3, 64, 64)).shape == (1, 3)\n"
        "import importlib.util; assert importlib.util.find_spec('ssm2d_path') is None\n"
    ),
    "ssm2d-path": (
        "import subprocess, sys, shutil\n"
        "import ssm2d_path, h5py, lifelines\n"
        "out = subprocess.run([shutil.which('ssm2d-path', path=sys.prefix + '/bin'), 'info', '--selftest'],\n"
        "                     capture_output=True, text=True, check=True).stdout\n"
        "import re\n"
        "assert re.search(r'CPU self-test +passed', out), out\n"
        "assert re.search(r'scan2d kernel on cpu +passed', out), out\n"
        "assert re.search(r'wavefront2d kernel on cpu +passed', out), out\n"
        "import importlib.util; assert importlib.util.find_spec('ssm2d_vision') is None\n"
        # The slide pipeline's dependencies: OpenSlide without a system library, timm on a CPU torch.
        "import openslide; assert openslide.__library_version__\n"
        "from ssm2d_path.wsi.encoder import build_encoder\n"
        "from ssm2d_path.wsi.settings import ExtractConfig\n"
        "enc = build_encoder(ExtractConfig(encoder='resnet10t'))\n"
        "assert enc.feature_dim == 512, enc.feature_dim\n"
    ),
}
_NEEDS = {"ssm2d-nn": ["ssm2d-kernels"], "ssm2d-vision": ["ssm2d-kernels", "ssm2d-nn"],
          "ssm2d-path": ["ssm2d-kernels", "ssm2d-nn"]}


@pytest.mark.parametrize("dist", PURE)
def test_package_alone_in_a_fresh_venv(wheelhouse, tmp_path, dist):
    py = _fresh_venv(tmp_path / "venv")
    wheels = [_wheel(wheelhouse, d) for d in _NEEDS[dist] + [dist]]
    # The ssm2d wheels come from the wheelhouse, everything else from the index, torch pinned.
    _pip(py, "install", "-q", "-c", CONSTRAINTS, *wheels)
    _pip(py, "check")
    run_checked([py, "-c", _CHECKS[dist]])
