"""Patch encoders: any timm model, randomly initialised or loaded from a local weights file.

:func:`build_encoder` creates ``timm.create_model(name, pretrained=False, num_classes=0, **kwargs)``
(never the network: pathology foundation-model weights are loaded from a file the user has, through
:func:`load_encoder_weights`), and the encoder's own evaluation preprocessing
(``timm.data.resolve_data_config`` + ``create_transform``), which maps a PIL RGB image to a
(3, H, W) float tensor.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Union

import torch
from torch import nn

from .settings import ExtractConfig

__all__ = ["Encoder", "build_encoder", "encoder_name", "file_sha256", "load_encoder_weights", "read_state_dict"]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

# Containers that training frameworks wrap a state dict in, tried in this order.
_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "module", "teacher", "network")
# Prefixes added by DataParallel/DDP ("module."), Lightning or wrappers ("model."), SSL heads ("backbone.").
_PREFIXES = ("module.", "model.", "backbone.", "encoder.", "_orig_mod.")
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_SHOWN = 5  # keys listed in a mismatch message


@dataclass
class Encoder:
    """A patch encoder ready to run.

    Attributes:
        model: the timm model in eval mode, classifier removed: (B, 3, H, W) -> (B, feature_dim).
        transform: PIL RGB image -> (3, H, W) float tensor (the encoder's evaluation preprocessing).
        feature_dim: D, the length of a patch's feature vector.
        name: the name in the output folder ``features_<name>``.
        arch: the timm model name.
        data_config: timm's resolved data config (input_size, interpolation, mean, std, crop_pct, ...).
        weights_path, weights_sha256: the loaded weights file and its SHA-256 ("" for random init).
    """

    model: nn.Module
    transform: Callable[[Any], torch.Tensor]
    feature_dim: int
    name: str
    arch: str
    data_config: dict = field(default_factory=dict)
    kwargs: dict = field(default_factory=dict)
    weights_path: str = ""
    weights_sha256: str = ""

    def provenance(self) -> dict[str, str]:
        """Attributes recorded in every features file this encoder writes."""
        return {"encoder": self.arch, "encoder_name": self.name,
                "encoder_kwargs": json.dumps(self.kwargs, sort_keys=True, default=repr),
                "encoder_weights": self.weights_path or "random-init", "encoder_weights_sha256": self.weights_sha256,
                "encoder_data_config": json.dumps(self.data_config, sort_keys=True, default=repr),
                "feature_dim": int(self.feature_dim)}


def encoder_name(cfg: ExtractConfig) -> str:
    """The folder name of an encoder: ``cfg.name`` or ``cfg.encoder``; raises ValueError naming the key
    when it is not a plain file name."""
    name = cfg.name or cfg.encoder
    key = "name" if cfg.name else "encoder"
    if not isinstance(name, str) or not _NAME_OK.match(name):
        raise ValueError(f"{key}: {name!r} cannot name the folder features_<name> (letters, digits, '._+-'); "
                         "set extract.name")
    return name


def file_sha256(path: PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file (read in 4 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: ``.safetensors``, else a ``torch.save`` file loaded with
    ``weights_only=True``; common containers (``state_dict``, ``model``, ``module``, ``teacher``, ...)
    are unwrapped. Raises ValueError naming the file when it is missing, unreadable or holds no tensors."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weights: {path} does not exist")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            from ssm2d_nn.fileio import load_weights

            obj = load_weights(path, what="weights")  # says what is wrong; never suggests an unsafe load
    except ValueError:
        raise
    except Exception as e:  # corrupt safetensors file, wrong format
        raise ValueError(f"weights: {path} cannot be read as a safetensors or torch weights file "
                         f"({type(e).__name__}: {e})") from None
    for _ in range(4):  # nested containers, e.g. {"model": {"state_dict": ...}}
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in _CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(f"weights: {path} holds a {type(obj).__name__}, not a state dict")
    sd = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise ValueError(f"weights: {path} holds no tensors (keys: {list(obj)[:_SHOWN]})")
    return sd


def _strip_prefixes(sd: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes that every key carries and the model's own keys do not."""
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if all(k.startswith(p) for k in sd) and not any(k.startswith(p) for k in model_keys):
                sd = {k[len(p):]: v for k, v in sd.items()}
                changed = True
    return sd


def _classifier_names(model: nn.Module) -> tuple[str, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    c = cfg.get("classifier") or ()
    names = (c,) if isinstance(c, str) else tuple(c)
    return names + tuple(n for n in ("head", "fc", "classifier", "head_dist") if n not in names)


def load_encoder_weights(model: nn.Module, path: PathLike) -> list[str]:
    """Load a local weights file into ``model`` strictly.

    Wrapper prefixes (``module.``, ``model.``, ``backbone.``, ...) are removed, and classifier-head
    tensors that the headless model (``num_classes=0``) lacks are dropped; every other key must match.

    Returns:
        The dropped classifier keys.
    Raises:
        ValueError naming the file and listing (the first few) missing and unexpected keys, or the
        tensors whose shapes differ.
    """
    path = Path(path)
    sd = read_state_dict(path)
    own = model.state_dict()
    sd = _strip_prefixes(sd, set(own))
    heads = _classifier_names(model)
    dropped = [k for k in sd if k not in own and any(k == h or k.startswith(h + ".") for h in heads)]
    for k in dropped:
        del sd[k]
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(k for k in set(sd) & set(own) if tuple(sd[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if keys:
                shown = ", ".join(keys[:_SHOWN]) if what != "shape mismatch" else ", ".join(
                    f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in keys[:_SHOWN])
                more = f" (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
                parts.append(f"{len(keys)} {what}: {shown}{more}")
        raise ValueError(f"weights: {path} does not match {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(sd, strict=True)
    if dropped:
        logger.info("%s: dropped classifier tensors %s (the encoder has no classifier)", path, dropped)
    return dropped


def build_encoder(cfg: ExtractConfig) -> Encoder:
    """The timm model ``cfg.encoder`` (headless, eval mode, on the CPU), its weights from
    ``cfg.weights`` when given, and its evaluation transform.

    Raises:
        ValueError naming the key for an unknown model, a hub name (which would need the network),
        a model that does not return pooled (B, D) features, or weights that do not fit.
    """
    from ssm2d_nn._compat import import_timm

    timm = import_timm()
    import timm.data  # noqa: F401  (the submodule with resolve_data_config / create_transform)

    arch = cfg.encoder
    if not isinstance(arch, str) or not arch:
        raise ValueError(f"encoder: expected a timm model name, got {arch!r}")
    if arch.startswith(("hf-hub:", "hf_hub:", "timm/")):
        raise ValueError(f"encoder: {arch!r} is a hub name, which needs the network; give the timm architecture "
                         "(e.g. vit_large_patch16_224) and the weights file (extract.weights)")
    name = encoder_name(cfg)
    kwargs = dict(cfg.encoder_kwargs or {})
    if not timm.is_model(arch):
        raise ValueError(f"encoder: {arch!r} is not a timm model (timm.list_models() lists them)")
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    except TypeError as e:
        raise ValueError(f"encoder_kwargs: {kwargs} rejected by timm model {arch!r}: {e}") from None
    weights_path, sha = "", ""
    if cfg.weights:
        load_encoder_weights(model, cfg.weights)
        weights_path, sha = str(Path(cfg.weights).resolve()), file_sha256(cfg.weights)
    model.eval()
    overrides = {}
    if "img_size" in kwargs:  # timm keeps the architecture's default input size in its pretrained_cfg
        s = kwargs["img_size"]
        h, w = (s, s) if isinstance(s, int) else tuple(s)
        overrides["input_size"] = (3, int(h), int(w))
    data_config = timm.data.resolve_data_config(overrides, model=model)
    transform = timm.data.create_transform(**data_config, is_training=False)
    # One dry run: the true output width (some models widen in a pre-logits layer) and a check that
    # the model pools (a feature-map model would give (B, C, h, w)).
    with torch.inference_mode():
        out = model(torch.zeros(1, *data_config["input_size"]))
    if out.ndim != 2:
        raise ValueError(f"encoder: {arch!r} with num_classes=0 returns shape {tuple(out.shape)}, expected pooled "
                         "(B, D) features (check encoder_kwargs, e.g. global_pool)")
    return Encoder(model=model, transform=transform, feature_dim=int(out.shape[1]), name=name, arch=arch,
                   data_config=dict(data_config), kwargs=kwargs, weights_path=weights_path, weights_sha256=sha)
