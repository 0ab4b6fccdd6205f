"""Released Mamba2D checkpoints <-> the timm models of :mod:`ssm2d_vision.models.m2d`.

Released layout (the training LightningModule's ``state_dict``; its ``.ckpt`` files hold it under
``"state_dict"``, the ``-EMA.ckpt`` files hold the EMA weights the same way)::

    backbone.ds.stem.conv.*               -> stem.conv.*
    backbone.ds.stem.post_norm.norm.*     -> stem.norm.*
    backbone.ds.ds{i}.conv.*              -> stages.{i}.downsample.conv.*
    backbone.stages.{i}.{j}.MLP.*         -> stages.{i}.blocks.{j}.mlp.*        (j < depth_i)
    backbone.stages.{i}.{j}.<other>       -> stages.{i}.blocks.{j}.<other>      (norm1, token_mixer.*, res_scale1, ...)
    backbone.stages.{i}.{depth_i}.*       -> stages.{i}.norm.*                  (the stage's closing LayerNorm)
    norm.*                                -> head.norm.*
    head.{fc1,norm,fc2}.*                 -> head.fc.{fc1,norm,fc2}.*

Also read: a bare backbone state dict (``ds.*``, ``stages.*``), mmseg/mmdet checkpoints (the
``backbone.*`` keys of their ``state_dict``; decode/auxiliary heads are left out) and keys
prefixed by ``module.`` (DDP) or ``_orig_mod.`` (torch.compile).
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from typing import Optional

import torch
from torch import Tensor
from ssm2d_nn.fileio import atomic_output

__all__ = ["MODEL_NAMES", "load_released", "ours_to_released", "released_to_ours", "save_state_dict"]

logger = logging.getLogger("ssm2d_vision")

MODEL_NAMES = ("m2d_nano", "m2d_tiny", "m2d_small")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _depths(model_name: str) -> tuple:
    from ..models.m2d import M2D_CONFIGS

    if model_name not in M2D_CONFIGS:
        raise ValueError(f"model_name must be one of {tuple(M2D_CONFIGS)}, got {model_name!r}")
    return tuple(M2D_CONFIGS[model_name]["depths"])


def _released_key_to_ours(key: str, depths: tuple) -> Optional[str]:
    m = re.fullmatch(r"backbone\.ds\.stem\.conv\.(weight|bias)", key)
    if m:
        return f"stem.conv.{m[1]}"
    m = re.fullmatch(r"backbone\.ds\.stem\.post_norm\.norm\.(weight|bias)", key)
    if m:
        return f"stem.norm.{m[1]}"
    m = re.fullmatch(r"backbone\.ds\.ds(\d+)\.conv\.(weight|bias)", key)
    if m and 1 <= int(m[1]) < len(depths):
        return f"stages.{int(m[1])}.downsample.conv.{m[2]}"
    m = re.fullmatch(r"backbone\.stages\.(\d+)\.(\d+)\.(.+)", key)
    if m and int(m[1]) < len(depths):
        i, j, rest = int(m[1]), int(m[2]), m[3]
        if j == depths[i] and rest in ("weight", "bias"):
            return f"stages.{i}.norm.{rest}"
        if j < depths[i]:
            rest = re.sub(r"^MLP\.", "mlp.", rest)
            return f"stages.{i}.blocks.{j}.{rest}"
        return None
    m = re.fullmatch(r"norm\.(weight|bias)", key)
    if m:
        return f"head.norm.{m[1]}"
    m = re.fullmatch(r"head\.(fc1|norm|fc2)\.(weight|bias)", key)
    if m:
        return f"head.fc.{m[1]}.{m[2]}"
    return None


def _our_key_to_released(key: str, depths: tuple) -> Optional[str]:
    m = re.fullmatch(r"stem\.conv\.(weight|bias)", key)
    if m:
        return f"backbone.ds.stem.conv.{m[1]}"
    m = re.fullmatch(r"stem\.norm\.(weight|bias)", key)
    if m:
        return f"backbone.ds.stem.post_norm.norm.{m[1]}"
    m = re.fullmatch(r"stages\.(\d+)\.downsample\.conv\.(weight|bias)", key)
    if m and 1 <= int(m[1]) < len(depths):
        return f"backbone.ds.ds{int(m[1])}.conv.{m[2]}"
    m = re.fullmatch(r"stages\.(\d+)\.norm\.(weight|bias)", key)
    if m and int(m[1]) < len(depths):
        return f"backbone.stages.{int(m[1])}.{depths[int(m[1])]}.{m[2]}"
    m = re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)\.(.+)", key)
    if m and int(m[1]) < len(depths) and int(m[2]) < depths[int(m[1])]:
        rest = re.sub(r"^mlp\.", "MLP.", m[3])
        return f"backbone.stages.{int(m[1])}.{int(m[2])}.{rest}"
    m = re.fullmatch(r"head\.norm\.(weight|bias)", key)
    if m:
        return f"norm.{m[1]}"
    m = re.fullmatch(r"head\.fc\.(fc1|norm|fc2)\.(weight|bias)", key)
    if m:
        return f"head.{m[1]}.{m[2]}"
    return None


def _convert(sd: dict, model_name: str, rename) -> tuple[dict, list]:
    depths = _depths(model_name)
    out, unmatched = {}, []
    for k, v in sd.items():
        new = rename(k, depths)
        if new is None:
            unmatched.append(k)
        else:
            out[new] = v
    return out, unmatched


def released_to_ours(sd: dict, model_name: str) -> dict:
    """Renames a released (LightningModule-layout) state dict to ours; tensors are not copied.

    Raises ValueError listing every key that has no counterpart (a different layout or model)."""
    out, unmatched = _convert(sd, model_name, _released_key_to_ours)
    if unmatched:
        raise ValueError(f"released_to_ours({model_name}): {len(unmatched)} key(s) with no counterpart: {unmatched}")
    return out


def ours_to_released(sd: dict, model_name: str) -> dict:
    """Renames our state dict to the released LightningModule layout (``backbone.*``, ``norm.*``,
    ``head.*``); tensors are not copied. Raises ValueError listing keys with no counterpart."""
    out, unmatched = _convert(sd, model_name, _our_key_to_released)
    if unmatched:
        raise ValueError(f"ours_to_released({model_name}): {len(unmatched)} key(s) with no counterpart: {unmatched}")
    return out


def _strip_wrappers(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
        key = key.replace("._orig_mod.", ".")
    return key


def _state_dict_of(obj, path: str) -> dict:
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a checkpoint dict or a state dict, got {type(obj).__name__}")
    for name in ("state_dict", "model", "state_dict_ema"):
        if isinstance(obj.get(name), dict) and any(isinstance(v, Tensor) for v in obj[name].values()):
            return obj[name]
    if obj and all(isinstance(v, Tensor) for v in obj.values()):
        return obj
    raise ValueError(f"{path}: no state dict found (looked for a 'state_dict' or 'model' entry, or a dict of "
                     f"tensors); top-level keys: {sorted(obj)[:20]}")


def _to_released_layout(sd: dict) -> tuple[dict, list]:
    """The released-layout subset of a checkpoint's state dict, and the keys left out on purpose."""
    sd = {_strip_wrappers(k): v for k, v in sd.items()}
    if any(k.startswith("backbone.") for k in sd):
        keep = lambda k: k.startswith("backbone.") or re.match(r"(norm|head\.(fc1|norm|fc2))\.", k)  # noqa: E731
        # mmseg/mmdet: decode_head.*, auxiliary_head.*, neck.* ... belong to the task, not the backbone.
        is_task = lambda k: not keep(k) and not k.startswith(("ds.", "stages."))  # noqa: E731
        ignored = [k for k in sd if is_task(k)]
        return {k: v for k, v in sd.items() if not is_task(k)}, ignored
    if any(k.startswith(("ds.", "stages.")) for k in sd):  # a bare backbone state dict
        return {(f"backbone.{k}" if k.startswith(("ds.", "stages.")) else k): v for k, v in sd.items()}, []
    return sd, []


def _expected_shapes(model_name: str, num_classes: int) -> dict:
    import timm

    from .. import models  # noqa: F401  (registers the models)

    with torch.device("meta"):
        model = timm.create_model(model_name, num_classes=num_classes)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def load_released(path: str, model_name: str, strict: bool = True) -> dict:
    """Reads a released Mamba2D checkpoint and returns the state dict of our ``model_name``.

    ``torch.load(path, map_location="cpu", weights_only=True)``. Accepts a Lightning ``.ckpt``
    (classifier, or its ``-EMA`` twin), a plain state dict, a bare backbone state dict or an
    mmseg/mmdet checkpoint (backbone keys only). A checkpoint without the classifier head (a
    backbone) gives a state dict without ``head.*``: load it with ``strict=False`` or into a
    ``num_classes=0`` model. The head size is taken from the checkpoint.

    Missing keys, unexpected keys and shape mismatches are collected; with ``strict`` a ValueError
    lists them all, otherwise they are warned about and the matching part is returned.
    """
    from ssm2d_nn.fileio import load_weights

    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_released: checkpoint file not found: {path}")
    obj = load_weights(path, what="checkpoint")  # weights only; ValueError saying what is wrong with the file
    released, ignored = _to_released_layout(_state_dict_of(obj, path))
    if ignored:
        logger.info("load_released(%s): left out %d non-backbone key(s) (e.g. %s)", path, len(ignored), ignored[:3])
    ours, unexpected = _convert(released, model_name, _released_key_to_ours)
    fc2 = ours.get("head.fc.fc2.weight")
    has_head = any(k.startswith("head.") for k in ours)
    expected = _expected_shapes(model_name, int(fc2.shape[0]) if fc2 is not None else 1000)
    if not has_head:
        expected = {k: s for k, s in expected.items() if not k.startswith("head.")}
        logger.info("load_released(%s): no classifier head in the checkpoint; returning the backbone only", path)
    unexpected += [k for k in ours if k not in expected]
    missing = [k for k in expected if k not in ours]
    mismatched = [f"{k}: checkpoint {tuple(ours[k].shape)} vs model {expected[k]}"
                  for k in ours if k in expected and tuple(ours[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing ({len(missing)}): {missing}")
    if unexpected:
        problems.append(f"unexpected ({len(unexpected)}): {unexpected}")
    if mismatched:
        problems.append(f"shape mismatch ({len(mismatched)}): {mismatched}")
    if problems:
        msg = f"load_released({path}, {model_name}): " + "; ".join(problems)
        if strict:
            raise ValueError(msg)
        warnings.warn(msg, stacklevel=2)
    bad = set(unexpected) | {m.split(":")[0] for m in mismatched}
    return {k: v for k, v in ours.items() if k not in bad}


def save_state_dict(sd: dict, path: str) -> None:
    """torch.save to a temporary file next to ``path``, then os.replace: never a half-written file."""
    with atomic_output(path) as tmp:
        torch.save(sd, tmp)
