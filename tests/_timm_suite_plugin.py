"""pytest plugin that runs timm's own ``tests/test_models.py`` over ssm2d-vision's models only.

Loaded with ``-p _timm_suite_plugin`` (this folder on PYTHONPATH) by ``test_timm_model_suite.py``,
which runs timm's unchanged test file from the source distribution of the installed timm. Plugins
load before test modules are imported, so the restriction below is in place when test_models.py
builds its ``list_models(...)`` parametrisations at import:

* ``timm.list_models`` is wrapped so that every call returns only our models (those the real call
  returns). Calls filtering by model module (test_models.py's ``FEAT_INTER_FILTERS``, the list of
  timm's model files whose models implement ``forward_intermediates`` and the ``features_only``
  getter wrapper) also accept our model modules, which implement both, as timm's own model files
  would be listed there.
* Collected items whose ``model_name`` is not one of ours (tests written for particular timm models,
  or parametrised by timm's test_* checkpoints) are deselected.
* TorchScript tests are deselected for our models, as timm does for its own non-scriptable models
  (``EXCLUDE_JIT_FILTERS``), for the reason in ``NOT_SCRIPTABLE_REASON``; the terminal summary and
  ``ssm2d_deselected.json`` (in the run's base folder) list them with it.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import ssm2d_vision  # noqa: F401  (registers the models with timm, before timm is used)
import timm
import timm.models
from ssm2d_vision.models import m2d, vmamba

OUR_MODELS = tuple(sorted(vmamba.MODEL_ARGS)) + tuple(sorted(m2d.M2D_CONFIGS))
# timm files a model under the last part of its defining module's name (register_model).
OUR_MODULES = tuple(mod.__name__.rsplit(".", 1)[-1] for mod in (vmamba, m2d))

NOT_SCRIPTABLE_REASON = (
    "ssm2d-vision's models are not TorchScript-scriptable: their mixers run Python that TorchScript cannot "
    "compile (the scan ops' backend selection and autograd wrappers); torch.jit.script raises a RuntimeError "
    "saying so (tested in packages/ssm2d-vision/tests/test_timm_conformance.py)")
TORCHSCRIPT_TESTS = ("test_model_forward_torchscript", "test_model_forward_fx_torchscript")

_real_list_models = timm.list_models
_signature = inspect.signature(_real_list_models)


def _base_name(name: str) -> str:
    return name.split(".", 1)[0]


def list_models(*args, **kwargs):
    """``timm.list_models`` restricted to our models (module filters also accept our modules)."""
    bound = _signature.bind(*args, **kwargs)
    module = bound.arguments.get("module", "")
    if module:
        modules = [module] if isinstance(module, str) else list(module)
        bound.arguments["module"] = modules + [m for m in OUR_MODULES if m not in modules]
    return [n for n in _real_list_models(*bound.args, **bound.kwargs) if _base_name(n) in OUR_MODELS]


timm.list_models = list_models
timm.models.list_models = list_models


def pytest_configure(config):
    # Markers of timm's CI plugins that are not installed here (pytest-timeout).
    config.addinivalue_line("markers", "timeout(seconds): per-test time limit (pytest-timeout, when installed)")


def _model_of(item):
    callspec = getattr(item, "callspec", None)
    name = callspec.params.get("model_name") if callspec is not None else None
    return _base_name(name) if isinstance(name, str) else None


def pytest_collection_modifyitems(session, config, items):
    keep, other, not_scriptable = [], [], []
    for item in items:
        model = _model_of(item)
        if model not in OUR_MODELS:
            other.append(item)
        elif item.originalname in TORCHSCRIPT_TESTS:
            not_scriptable.append(item)
        else:
            keep.append(item)
    if other or not_scriptable:
        config.hook.pytest_deselected(items=other + not_scriptable)
    items[:] = keep
    config._ssm2d_not_scriptable = [item.nodeid for item in not_scriptable]
    out = Path(str(config.rootpath)) / "ssm2d_deselected.json"
    out.write_text(json.dumps({"reason": NOT_SCRIPTABLE_REASON, "tests": config._ssm2d_not_scriptable,
                               "other_models_deselected": len(other)}, indent=1))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    ids = getattr(config, "_ssm2d_not_scriptable", [])
    if ids:
        terminalreporter.write_sep("=", f"ssm2d: {len(ids)} TorchScript tests deselected")
        terminalreporter.write_line(NOT_SCRIPTABLE_REASON)
        for nodeid in ids:
            terminalreporter.write_line(f"  {nodeid}")
