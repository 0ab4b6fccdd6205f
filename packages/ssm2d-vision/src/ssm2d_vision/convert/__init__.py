"""Converters from released checkpoints to ssm2d-vision's models (and back).

``CONVERTERS`` maps a model-name prefix to the module that converts it. Each converter module
provides ``MODEL_NAMES``, ``load_released(path, model_name, strict=True)`` (a released checkpoint file
-> our state dict, loaded with ``weights_only=True``, missing/unexpected keys raised when strict and
warned otherwise) and the two renaming directions ``released_to_ours`` / ``ours_to_released`` (see
each module for what they return). Adding a family is one line here.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["CONVERTERS", "converter_for"]

CONVERTERS = {
    "vmamba": "ssm2d_vision.convert.vmamba",  # vmamba_* and vmamba2d_*
    "m2d": "ssm2d_vision.convert.m2d",  # m2d_nano, m2d_tiny, m2d_small
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
