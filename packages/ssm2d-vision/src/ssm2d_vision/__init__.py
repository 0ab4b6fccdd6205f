"""ssm2d-vision: VMamba, 2DVMamba and Mamba2D backbones for timm, and segmentation on top.

Importing this package registers its models with timm (``timm.create_model(name)``), so it must
be imported before the models are created.
"""

from __future__ import annotations

from ._compat import ensure_torchvision_importable

ensure_torchvision_importable()

import timm  # noqa: E402  (after the torchvision repair above)

import ssm2d_nn  # noqa: E402

from .__about__ import __version__  # noqa: E402
from . import models  # noqa: E402,F401  (registers the models with timm)

__all__ = ["__version__", "timm"]
