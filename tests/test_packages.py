"""The four packages: importable together, versions consistent, dependencies as designed."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import re
import subprocess
import sys

import pytest

PACKAGES = {
    "ssm2d-kernels": "ssm2d_kernels",
    "ssm2d-nn": "ssm2d_nn",
    "ssm2d-vision": "ssm2d_vision",
    "ssm2d-path": "ssm2d_path",
}


def _requirements(dist: str, extra: str | None = None) -> dict[str, str]:
    """Requirement name -> full requirement string from the installed metadata."""
    out = {}
    for req in md.requires(dist) or []:
        spec, _, marker = req.partition(";")
        in_extra = re.search(r"extra\s*==\s*['\"]([\w-]+)['\"]", marker)
        if (extra is None) != (in_extra is None) or (in_extra and in_extra.group(1) != extra):
            continue
        name = re.match(r"[A-Za-z0-9_.-]+", spec.strip()).group(0).lower().replace("_", "-")
        out[name] = spec.strip()
    return out


@pytest.mark.parametrize("dist,module", PACKAGES.items())
def test_package_imports_and_reports_its_metadata_version(dist, module):
    mod = importlib.import_module(module)
    assert mod.__version__ == md.version(dist)
    about = importlib.import_module(f"{module}.__about__")
    assert about.__version__ == mod.__version__


def test_dependency_graph_is_kernels_nn_vision_and_nn_path():
    assert _requirements("ssm2d-kernels") == {}, "the kernel wheel must not depend on anything (not even torch)"
    nn = _requirements("ssm2d-nn")
    assert {"torch", "ssm2d-kernels"} <= nn.keys()
    vision = _requirements("ssm2d-vision")
    assert {"torch", "ssm2d-nn", "timm"} <= vision.keys() and "ssm2d-path" not in vision
    path = _requirements("ssm2d-path")
    assert {"torch", "ssm2d-nn", "lifelines", "h5py"} <= path.keys() and "ssm2d-vision" not in path
    assert "mmsegmentation" in _requirements("ssm2d-vision", extra="mmseg")
    for reqs in (nn, vision, path):
        assert re.fullmatch(r"torch\s*>=\s*2\.4", reqs["torch"]), reqs["torch"]


def test_nn_declares_the_kernels_range_it_checks_at_import():
    import ssm2d_nn

    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    declared = Requirement(_requirements("ssm2d-nn")["ssm2d-kernels"])
    assert declared.specifier == SpecifierSet(ssm2d_nn.KERNELS_REQUIREMENT)


def test_dev_environment_has_compatible_kernels():
    import ssm2d_nn

    status = ssm2d_nn.kernels_status()
    assert status.available, status.problem
    assert status.version == md.version("ssm2d-kernels")


@pytest.mark.parametrize(
    "version,ok",
    [(None, False), ("0.1.0", True), ("0.1.7", True), ("0.1.1.dev3", True), ("0.2.0", False),
     ("0.0.9", False), ("1.0.0", False), ("not-a-version", False)],
)
def test_kernels_version_check_says_what_to_install(version, ok):
    from ssm2d_nn._kernels import KERNELS_REQUIREMENT, check_kernels_version

    status = check_kernels_version(version)
    assert status.available is ok
    if not ok:
        assert f"'ssm2d-kernels{KERNELS_REQUIREMENT}'" in status.hint
        assert status.hint.startswith("pip install --upgrade" if version else "pip install '")
        assert (version or "not installed") in status.problem


_IMPORT_WITHOUT_KERNELS = r"""
import sys, warnings, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ssm2d_kernels" or name.startswith("ssm2d_kernels."):
            raise ModuleNotFoundError("No module named 'ssm2d_kernels'")
        return None
sys.meta_path.insert(0, Block())
FAKE
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import ssm2d_nn
msgs = [str(w.message) for w in caught if w.category is ssm2d_nn.KernelsUnavailableWarning]
assert len(msgs) == 1, msgs
print(msgs[0])
import torch
assert ssm2d_nn.resolve_backend("op", "auto", torch.device("cpu")) == "reference"
try:
    ssm2d_nn.resolve_backend("op", "kernel", torch.device("cpu"))
except ssm2d_nn.BackendUnavailableError as e:
    print("kernel refused:", e)
else:
    raise SystemExit("backend='kernel' did not raise")
"""


@pytest.mark.parametrize("situation", ["missing", "incompatible"])
def test_nn_imports_without_usable_kernels_and_names_the_fix(situation):
    fake = ""
    if situation == "incompatible":
        # An installed wheel from a future, incompatible release.
        fake = "import types; m = types.ModuleType('ssm2d_kernels'); m.__version__ = '0.9.0'; sys.modules['ssm2d_kernels'] = m"
    code = _IMPORT_WITHOUT_KERNELS.replace("FAKE", fake)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    from ssm2d_nn._kernels import KERNELS_REQUIREMENT

    fix = ("pip install --upgrade " if situation == "incompatible" else "pip install ") + f"'ssm2d-kernels{KERNELS_REQUIREMENT}'"
    assert fix in proc.stdout
    assert ("0.9.0" in proc.stdout) == (situation == "incompatible")
    assert "kernel refused:" in proc.stdout and fix in proc.stdout.split("kernel refused:")[1]
