"""Importing timm where torchvision's compiled ops do not match torch.

The repair lives in :mod:`ssm2d_nn._compat` (ssm2d-path needs it too and must not depend on
ssm2d-vision); this module re-exports it under its former name.
"""

from __future__ import annotations

from ssm2d_nn._compat import (  # noqa: F401  (re-exported)
    _MISSING_OP,
    _TORCHVISION_SCHEMAS,
    declared,
    ensure_torchvision_importable,
    import_timm,
)

__all__ = ["declared", "ensure_torchvision_importable", "import_timm"]
