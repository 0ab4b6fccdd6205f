"""A pure-PyTorch stand-in for ``mmcv.ops`` where mmcv-lite (no compiled ops) is installed.

mmsegmentation 1.2.2 imports ``mmcv.ops`` unconditionally in four modules (``point_sample`` in
three, ``sigmoid_focal_loss`` in one) that ``mmseg.models`` always loads; its other uses sit
behind ``try/except ModuleNotFoundError``. mmcv-lite ships ``mmcv/ops`` without its compiled library, so
that import fails and ``mmseg.models`` cannot load. When (and only when) ``import mmcv.ops``
fails, a module providing those two functions in plain PyTorch is installed as ``mmcv.ops``.
UperNet and FCN heads use neither. Asking the stand-in for any other op raises
ModuleNotFoundError (what mmseg's guarded imports catch), so heads that need other compiled ops
(CCNet, PSANet, deformable convs) are unavailable as they would be without mmcv's ops.
"""

from __future__ import annotations

import logging
import sys
import types

import torch
import torch.nn.functional as F

logger = logging.getLogger("ssm2d_vision")

STAND_IN_FLAG = "__ssm2d_vision_stand_in__"


def point_sample(input: torch.Tensor, points: torch.Tensor, align_corners: bool = False,
                 **kwargs) -> torch.Tensor:
    """mmcv's ``point_sample``: bilinear samples of ``input`` (N, C, H, W) at ``points`` given in
    [0, 1] x [0, 1] (x, y) coordinates, (N, P, 2) -> (N, C, P) or (N, Hp, Wp, 2) -> (N, C, Hp, Wp)."""
    add_dim = points.dim() == 3
    if add_dim:
        points = points.unsqueeze(2)
    out = F.grid_sample(input, 2.0 * points - 1.0, align_corners=align_corners, **kwargs)
    return out.squeeze(3) if add_dim else out


def sigmoid_focal_loss(input: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, alpha: float = 0.25,
                       weight: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """mmcv's ``sigmoid_focal_loss``: input logits (N, K), target class indices (N,) (a value
    outside [0, K) marks a sample that is negative for every class), optional per-sample weight
    (N,); per-element loss (N, K) reduced by ``reduction`` ('none' | 'mean' | 'sum')."""
    if input.dim() != 2 or target.dim() != 1 or target.shape[0] != input.shape[0]:
        raise ValueError(f"sigmoid_focal_loss expects input (N, K) and target (N,), got "
                         f"{tuple(input.shape)} and {tuple(target.shape)}")
    num_classes = input.shape[1]
    classes = torch.arange(num_classes, device=input.device)
    t = (target.long().unsqueeze(1) == classes).to(input.dtype)
    p = input.sigmoid()
    pt = (1 - p) * t + p * (1 - t)
    focal = (alpha * t + (1 - alpha) * (1 - t)) * pt.pow(gamma)
    loss = F.binary_cross_entropy_with_logits(input, t, reduction="none") * focal
    if weight is not None:
        loss = loss * weight.view(-1, 1)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / input.shape[0]
    raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")


def _missing_op(name: str):
    # Dunder look-ups come from the import machinery and hasattr(): they must stay AttributeError.
    if name.startswith("__"):
        raise AttributeError(name)
    raise ModuleNotFoundError(f"mmcv.ops.{name} is a compiled op: mmcv-lite lacks it and the stand-in "
                              f"installed by ssm2d_vision.mmseg provides only point_sample and "
                              f"sigmoid_focal_loss (install a full mmcv for it)", name="mmcv.ops")


def ensure_mmcv_ops() -> bool:
    """Installs the stand-in as ``mmcv.ops`` if importing the real one fails; returns whether it did."""
    import mmcv

    existing = sys.modules.get("mmcv.ops")
    if existing is not None and getattr(existing, STAND_IN_FLAG, False):
        return True
    try:
        import mmcv.ops  # noqa: F401
        return False
    except ImportError as exc:
        reason = f"{type(exc).__name__}: {exc}"
    # Drop the half-imported mmcv.ops.* modules of the failed attempt.
    for name in [m for m in sys.modules if m == "mmcv.ops" or m.startswith("mmcv.ops.")]:
        del sys.modules[name]
    module = types.ModuleType("mmcv.ops", "Pure-PyTorch stand-in for mmcv.ops (installed by ssm2d_vision.mmseg)")
    module.point_sample = point_sample
    module.sigmoid_focal_loss = sigmoid_focal_loss
    module.__getattr__ = _missing_op
    setattr(module, STAND_IN_FLAG, True)
    sys.modules["mmcv.ops"] = module
    mmcv.ops = module
    logger.warning(
        "mmcv.ops is unavailable (%s; mmcv-lite has no compiled ops): installed a pure-PyTorch "
        "stand-in providing point_sample and sigmoid_focal_loss so that mmseg.models imports", reason)
    return True
