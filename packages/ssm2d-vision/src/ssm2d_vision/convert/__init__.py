"""Converters from released checkpoints to ssm2d-vision's models (and back).

``CONVERTERS`` maps a model-name prefix to the module that converts it. Each converter module
provides ``MODEL_NAMES``, ``released_to_ours(sd, model_name)``, ``ours_to_released(sd, model_name)``
(both returning ``(state_dict, keys_without_counterpart)``) and ``load_released(path, model_name,
strict=True)``. Adding a family is one line here.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["CONVERTERS", "converter_for"]

CONVERTERS = {
    "vmamba": "ssm2d_vision.convert.vmamba",  # vmamba_* and vmamba2d_*
}


def converter_for(model_name: str) -> ModuleType:
    """The converter module for ``model_name`` (longest matching prefix)."""
    matches = [p for p in CONVERTERS if model_name.startswith(p)]
    if not matches:
        raise ValueError(f"no converter for model {model_name!r}; known prefixes: {sorted(CONVERTERS)}")
    module = importlib.import_module(CONVERTERS[max(matches, key=len)])
    if model_name not in module.MODEL_NAMES:
        raise ValueError(f"unknown model {model_name!r}; {module.__name__} converts {module.MODEL_NAMES}")
    return module
