"""ssm2d_vision imports timm even where torchvision's compiled ops do not load."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ssm2d_vision import _compat


def test_timm_usable_after_import():
    import torch

    import ssm2d_vision

    m = ssm2d_vision.timm.create_model("resnet10t", num_classes=5)
    x = torch.randn(2, 3, 64, 64)
    assert m(x).shape == (2, 5)


def test_only_the_missing_operator_failure_is_repaired():
    assert _compat._MISSING_OP.search("RuntimeError: operator torchvision::nms does not exist").group(1) == "nms"
    assert _compat._MISSING_OP.search("operator torch::nms does not exist") is None
    assert set(_compat.declared) <= set(_compat._TORCHVISION_SCHEMAS)


def test_fresh_interpreter_imports_in_either_order():
    # torchvision first on its own fails on a CPU torch with PyPI's CUDA torchvision; through
    # ssm2d_vision it must always work, and importing torchvision afterwards too.
    code = "import ssm2d_vision, torchvision, timm; print(timm.__version__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("message", ["something else went wrong", "operator torchvision::roi_magic does not exist"])
def test_unrelated_errors_propagate(monkeypatch, message):
    import builtins

    real_import = builtins.__import__

    def failing_import(name, *args, **kwargs):
        if name == "torchvision":
            raise RuntimeError(message)
        return real_import(name, *args, **kwargs)

    saved = {m: sys.modules.pop(m) for m in list(sys.modules) if m == "torchvision" or m.startswith("torchvision.")}
    monkeypatch.setattr(builtins, "__import__", failing_import)
    try:
        with pytest.raises(RuntimeError, match=message.split("::")[-1]):
            _compat.ensure_torchvision_importable()
    finally:
        monkeypatch.undo()
        sys.modules.update(saved)
