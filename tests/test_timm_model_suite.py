"""timm's own model test suite (``tests/test_models.py`` of the installed timm's source distribution,
unchanged) over ssm2d-vision's eight models: every test timm runs for a model of its own.

The source distribution of the installed timm version is downloaded once with pip into
``build/timm-sdist/`` (later runs reuse it) and its test file, conftest and pytest configuration are
unpacked into ``build/timm-tests/<version>/``. pytest then runs there in a subprocess with
``_timm_suite_plugin`` (this folder), which restricts timm's ``list_models`` parametrisations to our
models and deselects the TorchScript tests (our models declare themselves not scriptable, as timm
excludes its own non-scriptable models; ``torch.jit.script`` raising is tested in the vision
package). Sizes are the test file's own: it picks them from each model's ``pretrained_cfg``
(``input_size`` 224, capped per test by its TARGET_* / MAX_* limits: 224 forward, 128 backward and FX,
96 features; the config test runs on the "meta" device). The test fails when any of timm's tests
fails or is skipped, and when any of the per-model tests expected below did not run for a model.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from _support import ROOT

pytestmark = pytest.mark.slow

MODELS = ("vmamba_tiny", "vmamba_small", "vmamba_base", "vmamba2d_tiny", "vmamba2d_small",
          "m2d_nano", "m2d_tiny", "m2d_small")
# The per-model tests of timm's test_models.py that apply to models like ours (classification
# models with forward_intermediates and the features_only getter): all must run for every model.
PER_MODEL_TESTS = ("test_model_forward", "test_model_backward", "test_model_default_cfgs",
                   "test_model_forward_features", "test_model_forward_intermediates_features",
                   "test_model_forward_intermediates", "test_prune_intermediate_layers_contract",
                   "test_model_forward_fx", "test_model_backward_fx")
TORCHSCRIPT_TESTS = ("test_model_forward_torchscript", "test_model_forward_fx_torchscript")
SDIST_FILES = ("pyproject.toml", "tests/__init__.py", "tests/conftest.py", "tests/test_models.py")


def _sdist(version: str) -> Path:
    """The cached timm-<version>.tar.gz, downloaded with pip (no wheels: the source distribution)."""
    cache = ROOT / "build" / "timm-sdist"
    path = cache / f"timm-{version}.tar.gz"
    if path.is_file():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
               "--no-binary", ":all:", f"timm=={version}", "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        got = list(Path(tmp).glob(f"timm-{version}.tar.gz"))
        if proc.returncode != 0 or not got:
            pytest.fail(f"could not download timm {version}'s source distribution ({' '.join(cmd)}):\n"
                        f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        os.replace(got[0], path)
    return path


def _unpack(sdist: Path, version: str) -> Path:
    """timm's test file, its conftest and pytest configuration, byte for byte from the sdist."""
    dest = ROOT / "build" / "timm-tests" / version
    if dest.exists():
        shutil.rmtree(dest)
    with tarfile.open(sdist) as tar:
        for rel in SDIST_FILES:
            member = tar.extractfile(f"timm-{version}/{rel}")
            assert member is not None, f"{sdist.name} has no {rel}"
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_bytes(member.read())
    return dest


def _outcomes(junit: Path) -> dict[str, str]:
    """nodeid-like 'test_name[params]' -> passed / failed / error / skipped."""
    result = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        tags = {child.tag for child in case}
        outcome = ("failed" if "failure" in tags else "error" if "error" in tags
                   else "skipped" if "skipped" in tags else "passed")
        result[case.get("name")] = outcome
    return result


def _model(test_id: str) -> tuple[str, str]:
    """'test_model_forward[1-vmamba_tiny]' -> ('test_model_forward', 'vmamba_tiny')."""
    name, _, params = test_id.partition("[")
    return name, params.rstrip("]").split("-")[-1]


def test_timm_model_suite_passes_for_our_models():
    version = importlib.metadata.version("timm")
    workdir = _unpack(_sdist(version), version)
    junit = workdir / "junit.xml"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), *filter(None, [env.get("PYTHONPATH")])])
    # The models are small at the test file's sizes: one thread per op is faster (2.2 vs 2.7 minutes
    # on two cores) and does not thrash when other processes share the cores.
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "pytest", "tests/test_models.py", "-p", "_timm_suite_plugin",
           "-p", "no:cacheprovider", "-q", "-rfEs", "--durations=10", f"--junitxml={junit}"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=1800)
    elapsed = time.time() - t0
    (workdir / "pytest.log").write_text(proc.stdout + proc.stderr)
    print(f"timm {version} test_models.py over {len(MODELS)} models: {elapsed:.0f} s; "
          f"log {workdir / 'pytest.log'}\n{proc.stdout[-2500:]}")
    assert junit.is_file(), f"timm's suite did not run (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    outcomes = _outcomes(junit)
    bad = {t: o for t, o in outcomes.items() if o != "passed"}
    assert not bad, f"timm's tests not passing for our models: {bad}\n{proc.stdout[-6000:]}"
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"

    ran = {_model(t) for t in outcomes}
    assert {m for _, m in ran} == set(MODELS), f"ran for other models than ours: {sorted(ran)}"
    missing = [(t, m) for t in PER_MODEL_TESTS for m in MODELS if (t, m) not in ran]
    assert not missing, f"expected per-model tests that did not run: {missing}"
    # Only the TorchScript tests of our models were set aside, every one of them with the reason.
    deselected = json.loads((workdir / "ssm2d_deselected.json").read_text())
    assert sorted(_model(t.split("::")[-1]) for t in deselected["tests"]) == sorted(
        (t, m) for t in TORCHSCRIPT_TESTS for m in MODELS)
    assert "not TorchScript-scriptable" in deselected["reason"]
