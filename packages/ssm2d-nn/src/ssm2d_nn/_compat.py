"""Importing timm where torchvision's compiled ops do not match torch.

PyPI has no CPU build of torchvision. Next to a CPU torch, the CUDA torchvision wheel fails at
import with ``operator torchvision::nms does not exist``: its Python side registers fake kernels
for compiled detection ops that its library could not load. timm imports torchvision, so
``import timm`` fails there too. The ssm2d packages use none of those detection ops (ssm2d-vision's
backbones and ssm2d-path's patch encoders need timm only), so when (and only when) that exact
failure happens, the missing operator schemas are declared and torchvision is
imported again; calling one of those ops then raises. With a matching torch/torchvision pair
nothing here runs.
"""

from __future__ import annotations

import logging
import re
import sys

import torch

__all__ = ["declared", "ensure_torchvision_importable", "import_timm"]

logger = logging.getLogger("ssm2d_nn")

# Schemas of torchvision's compiled ops whose fake kernels its Python side registers at import and
# that are absent when its library cannot load next to a CPU torch (seen: nms, qnms).
_TORCHVISION_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_MISSING_OP = re.compile(r"operator torchvision::(\w+) does not exist")
_library: torch.library.Library | None = None  # kept alive: dropping it would remove the schemas
declared: list[str] = []


def _purge_torchvision() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def ensure_torchvision_importable() -> None:
    """Imports torchvision, repairing only the 'operator torchvision::X does not exist' failure."""
    global _library
    if "torchvision" in sys.modules:
        return
    while True:
        try:
            import torchvision  # noqa: F401
        except RuntimeError as exc:
            match = _MISSING_OP.search(str(exc))
            if not match or match.group(1) not in _TORCHVISION_SCHEMAS or match.group(1) in declared:
                raise
            _purge_torchvision()
            if _library is None:
                _library = torch.library.Library("torchvision", "FRAGMENT")
            _library.define(_TORCHVISION_SCHEMAS[match.group(1)])
            declared.append(match.group(1))
            continue
        break
    if declared:
        logger.info(
            "torchvision's compiled ops do not match torch %s; declared torchvision::%s so that timm "
            "imports (the ssm2d packages do not use them; calling them raises)",
            torch.__version__, ", ".join(declared),
        )


def import_timm():
    """``import timm`` after :func:`ensure_torchvision_importable`; returns the timm module."""
    ensure_torchvision_importable()
    import timm

    return timm
