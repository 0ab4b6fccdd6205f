"""Released VMamba v2 / 2DVMamba checkpoints <-> ssm2d-vision's VMamba state dicts.

Released names (classification ``checkpoint['model']``; the mmseg/mmdet backbone under ``backbone.``
in ``checkpoint['state_dict']``, with one ``outnorm{i}`` per stage and no classifier):

    patch_embed.{0,5}.{weight,bias}      stem convs          -> stem.conv{1,2}
    patch_embed.{2,7}.{weight,bias}      stem LayerNorms     -> stem.norm{1,2}
    layers.{i}.blocks.{j}.norm / .op / .norm2 / .mlp.fc{1,2} -> stages.{i}.blocks.{j}.norm1 / .ssm / .norm2 / .mlp.fc{1,2}
    layers.{i}.downsample.{1,3}          conv / LN after stage i -> stages.{i+1}.downsample.{conv,norm}
    classifier.norm / classifier.head    -> norm / head.fc
    outnorm{i}                           -> out_norms.{i}

The released 1x1 projections are Linear2d layers, stored (out, in); ours are 1x1 convs, stored
(out, in, 1, 1). 2DVMamba checkpoints use the VMamba names (no parameter is added).
"""

from __future__ import annotations

import re
import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..models.vmamba import MODEL_ARGS

__all__ = ["MODEL_NAMES", "released_to_ours", "ours_to_released", "load_released", "unwrap_checkpoint",
           "is_released_layout"]

MODEL_NAMES = tuple(MODEL_ARGS)
# Our keys whose tensors are 1x1 conv weights where the released model keeps Linear2d weights.
_LINEAR2D = re.compile(r"\.(ssm\.in_proj|ssm\.out_proj|mlp\.fc1|mlp\.fc2)\.weight$")
_FIXED = [  # (released prefix, our prefix)
    ("patch_embed.0.", "stem.conv1."),
    ("patch_embed.2.", "stem.norm1."),
    ("patch_embed.5.", "stem.conv2."),
    ("patch_embed.7.", "stem.norm2."),
    ("classifier.norm.", "norm."),
    ("classifier.head.", "head.fc."),
]
_BLOCK_PARTS = [("norm.", "norm1."), ("op.", "ssm."), ("norm2.", "norm2."), ("mlp.", "mlp.")]


def _check_model(model_name: str) -> None:
    if model_name not in MODEL_ARGS:
        raise ValueError(f"unknown VMamba model {model_name!r}; expected one of {MODEL_NAMES}")


def _rename_released(key: str) -> Optional[str]:
    for src, dst in _FIXED:
        if key.startswith(src):
            return dst + key[len(src):]
    m = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.(.*)$", key)
    if m:
        rest = m.group(3)
        for src, dst in _BLOCK_PARTS:
            if rest.startswith(src):
                return f"stages.{m.group(1)}.blocks.{m.group(2)}.{dst}{rest[len(src):]}"
        return None
    m = re.match(r"layers\.(\d+)\.downsample\.([13])\.(weight|bias)$", key)
    if m:
        part = "conv" if m.group(2) == "1" else "norm"
        return f"stages.{int(m.group(1)) + 1}.downsample.{part}.{m.group(3)}"
    m = re.match(r"outnorm(\d+)\.(weight|bias)$", key)
    if m:
        return f"out_norms.{m.group(1)}.{m.group(2)}"
    return None


def _rename_ours(key: str) -> Optional[str]:
    for src, dst in _FIXED:
        if key.startswith(dst):
            return src + key[len(dst):]
    m = re.match(r"stages\.(\d+)\.blocks\.(\d+)\.(.*)$", key)
    if m:
        rest = m.group(3)
        for src, dst in _BLOCK_PARTS:
            if rest.startswith(dst):
                return f"layers.{m.group(1)}.blocks.{m.group(2)}.{src}{rest[len(dst):]}"
        return None
    m = re.match(r"stages\.(\d+)\.downsample\.(conv|norm)\.(weight|bias)$", key)
    if m:
        part = "1" if m.group(2) == "conv" else "3"
        return f"layers.{int(m.group(1)) - 1}.downsample.{part}.{m.group(3)}"
    m = re.match(r"out_norms\.(\d+)\.(weight|bias)$", key)
    if m:
        return f"outnorm{m.group(1)}.{m.group(2)}"
    return None


def unwrap_checkpoint(obj) -> Dict[str, Tensor]:
    """The state dict inside a checkpoint: ``obj['model']``, ``obj['state_dict']`` or ``obj`` itself.
    An mmseg/mmdet checkpoint's ``backbone.`` keys are kept with the prefix stripped; its other keys
    (decode_head, auxiliary_head, ...) are dropped."""
    if not isinstance(obj, dict):
        raise TypeError(f"checkpoint must be a dict (a state dict or one holding 'model'/'state_dict'), "
                        f"got {type(obj).__name__}")
    for key in ("model", "state_dict"):
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    sd = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if any(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    return sd


def released_to_ours(sd: Dict[str, Tensor], model_name: str) -> Tuple[Dict[str, Tensor], List[str]]:
    """Released keys -> ours. Returns (converted state dict, released keys that have no counterpart).

    ``sd`` may be a whole checkpoint (see :func:`unwrap_checkpoint`). Tensors are not copied.
    """
    _check_model(model_name)
    return _released_to_ours(sd)


def is_released_layout(sd: Dict[str, Tensor]) -> bool:
    """Whether the state dict (or checkpoint) holds the authors' key names rather than ours."""
    keys = list(unwrap_checkpoint(sd))
    return any(k.startswith(("patch_embed.", "layers.", "classifier.")) for k in keys) and not any(
        k.startswith(("stem.", "stages.")) for k in keys)


def _released_to_ours(sd: Dict[str, Tensor]) -> Tuple[Dict[str, Tensor], List[str]]:
    sd = unwrap_checkpoint(sd)
    out, unknown = {}, []
    for key, t in sd.items():
        new = _rename_released(key)
        if new is None:
            unknown.append(key)
            continue
        if _LINEAR2D.search(new) and t.dim() == 2:
            t = t.view(*t.shape, 1, 1)
        out[new] = t
    return out, unknown


def ours_to_released(sd: Dict[str, Tensor], model_name: str) -> Tuple[Dict[str, Tensor], List[str]]:
    """Our keys -> the released classification names (``outnorm{i}`` for per-stage norms).
    Returns (converted state dict, our keys that have no released counterpart)."""
    _check_model(model_name)
    out, unknown = {}, []
    for key, t in sd.items():
        new = _rename_ours(key)
        if new is None:
            unknown.append(key)
            continue
        if _LINEAR2D.search(key) and t.dim() == 4:
            t = t.view(t.shape[0], t.shape[1])
        out[new] = t
    return out, unknown


def expected_state(model_name: str, num_classes: int, out_norms: bool) -> Dict[str, Tuple[int, ...]]:
    """Our key -> shape for ``model_name`` (built on the meta device: no memory, no init cost)."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(model_name, num_classes=num_classes, out_norms=out_norms)
    if num_classes == 0:
        model.norm = torch.nn.Identity() if out_norms else model.norm
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def compare_keys(ours: Dict[str, Tensor], expected: Dict[str, Tuple[int, ...]]) -> Tuple[List[str], List[str], List[str]]:
    """(missing, unexpected, shape mismatches as 'key: got -> expected')."""
    missing = sorted(set(expected) - set(ours))
    unexpected = sorted(set(ours) - set(expected))
    bad = [f"{k}: {tuple(ours[k].shape)} -> expected {expected[k]}" for k in sorted(set(ours) & set(expected))
           if tuple(ours[k].shape) != expected[k]]
    return missing, unexpected, bad


def _report(problems: Dict[str, List[str]], path: str, strict: bool) -> None:
    problems = {k: v for k, v in problems.items() if v}
    if not problems:
        return
    text = "; ".join(f"{k} ({len(v)}): {v}" for k, v in problems.items())
    msg = f"checkpoint {path}: {text}"
    if strict:
        raise RuntimeError(msg)
    warnings.warn(msg, stacklevel=3)


def load_released(path: str, model_name: str, strict: bool = True, model: Optional[torch.nn.Module] = None
                  ) -> Dict[str, Tensor]:
    """Reads a released VMamba / 2DVMamba checkpoint (classification or mmseg backbone) and returns it
    as our state dict; with ``model`` also loads it there.

    The result is checked against our model of ``model_name`` (classes taken from the checkpoint's
    head; per-stage norms if the checkpoint has ``outnorm{i}``): keys without a counterpart, missing
    and unexpected keys and shape mismatches raise a RuntimeError listing them when ``strict``, and
    are reported with a warning otherwise. A file that is missing (FileNotFoundError), empty,
    truncated, not a ``torch.save`` file, or holds anything but weights (pickled objects are never
    loaded) raises ValueError naming it.
    """
    from ssm2d_nn.fileio import load_weights

    _check_model(model_name)
    obj = load_weights(path, what="checkpoint")  # weights only; ValueError saying what is wrong with the file
    try:
        ours, unknown = released_to_ours(obj, model_name)
    except TypeError as exc:
        raise ValueError(f"checkpoint {path!r}: {exc}") from None
    if not ours and not unknown:
        raise ValueError(f"checkpoint {path!r} holds no tensors (an empty state dict?)")
    head = ours.get("head.fc.weight")
    num_classes = head.shape[0] if head is not None else 0
    has_out_norms = any(k.startswith("out_norms.") for k in ours)
    expected = expected_state(model_name, num_classes, has_out_norms)
    missing, unexpected, bad = compare_keys(ours, expected)
    _report({"keys with no counterpart": unknown, "missing keys": missing, "unexpected keys": unexpected,
             "shape mismatches": bad}, path, strict)
    if model is not None:
        result = model.load_state_dict({k: v for k, v in ours.items() if k not in bad}, strict=strict)
        if not strict and (result.missing_keys or result.unexpected_keys):
            warnings.warn(f"loading {path} into the model: missing {result.missing_keys}, "
                          f"unexpected {result.unexpected_keys}", stacklevel=2)
    return ours
