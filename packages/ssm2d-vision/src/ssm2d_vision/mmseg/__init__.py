"""mmsegmentation integration: ``custom_imports=dict(imports=['ssm2d_vision.mmseg'])`` in a config
registers :class:`SSM2DBackbone` (any timm ``features_only`` model, this package's included) with
mmseg's ``MODELS``.

Where mmcv-lite is installed (mmcv without compiled ops), importing this module first installs a
pure-PyTorch stand-in for the two ``mmcv.ops`` functions that ``mmseg.models`` imports (and logs
that it did); with a full mmcv nothing is replaced. The shipped ADE20K UperNet configs are found
with :func:`config_path`.
"""

from __future__ import annotations

try:
    import mmcv  # noqa: F401
    import mmengine  # noqa: F401
    import mmseg  # noqa: F401
except ImportError as exc:
    raise ImportError(
        f"ssm2d_vision.mmseg needs mmsegmentation, mmengine and mmcv ({exc}); install them with "
        f'pip install "ssm2d-vision[mmseg]"'
    ) from exc

import ssm2d_vision  # noqa: F401  (torchvision repair + timm registration before mmseg loads timm)

from ._mmcv_ops import ensure_mmcv_ops

STAND_IN_INSTALLED = ensure_mmcv_ops()

import mmseg.models  # noqa: E402,F401  (fills mmseg's registries: UPerHead, FCNHead, EncoderDecoder, ...)

from .backbone import SSM2DBackbone, load_backbone_checkpoint  # noqa: E402
from ._paths import CONFIGS, config_path  # noqa: E402

__all__ = ["SSM2DBackbone", "load_backbone_checkpoint", "config_path", "CONFIGS", "STAND_IN_INSTALLED"]
