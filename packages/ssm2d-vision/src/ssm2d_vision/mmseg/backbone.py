"""``SSM2DBackbone``: any timm ``features_only`` model as an mmsegmentation backbone."""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Mapping, Sequence

import torch
from mmengine.model import BaseModule
from mmseg.registry import MODELS
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

logger = logging.getLogger("ssm2d_vision")

__all__ = ["SSM2DBackbone", "load_backbone_checkpoint"]

# Wrappers around a state dict in the usual training checkpoints, tried in this order.
_STATE_DICT_KEYS = ("state_dict", "model", "model_ema", "module")
# Prefixes a backbone's keys carry in detection/segmentation or DDP checkpoints.
_KEY_PREFIXES = ("module.", "backbone.", "encoder.")


@MODELS.register_module()
class SSM2DBackbone(BaseModule):
    """A timm model built with ``features_only=True``, returning its maps as a tuple.

    Args:
        model_name: timm model name, e.g. ``"vmamba_tiny"``, ``"m2d_nano"`` (this package's models
            are registered with timm on import) or any timm model with ``features_only`` support.
        out_indices: feature levels to return (0..3 = strides 4/8/16/32 for this package's models).
        drop_path_rate: stochastic depth rate; None keeps the model's default.
        checkpoint: a local file of pretrained weights, loaded with ``torch.load(weights_only=True)``:
            a state dict of the timm model (classification heads are ignored; ``state_dict`` /
            ``model`` wrappers and ``module.`` / ``backbone.`` prefixes are removed). A checkpoint
            in the authors' released format is converted with ``ssm2d_vision.convert.load_released``.
        frozen_stages: freeze (no gradient, eval mode) the stem and feature levels 0..frozen_stages;
            -1 freezes nothing.
        norm_eval: keep every BatchNorm in eval mode (running statistics frozen) during training.
        init_cfg: mmengine init config (normally None: the timm model initialises itself).
        **model_kwargs: further keyword arguments of ``timm.create_model``.

    Input (B, 3, H, W) -> tuple of (B, C_i, H / r_i, W / r_i) for the requested levels, where C_i and
    r_i are ``self.channels`` and ``self.reductions``.
    """

    def __init__(self, model_name: str, out_indices: Sequence[int] = (0, 1, 2, 3),
                 drop_path_rate: float | None = None, checkpoint: str | None = None, frozen_stages: int = -1,
                 norm_eval: bool = False, init_cfg: dict | None = None, **model_kwargs):
        super().__init__(init_cfg=init_cfg)
        import ssm2d_vision  # noqa: F401  (registers this package's models with timm)
        import timm

        if not isinstance(model_name, str) or not timm.is_model(model_name):
            raise ValueError(f"model_name: timm has no model {model_name!r}")
        if drop_path_rate is not None:
            model_kwargs["drop_path_rate"] = drop_path_rate
        self.model_name = model_name
        self.model = timm.create_model(model_name, pretrained=False, features_only=True,
                                       out_indices=tuple(out_indices), **model_kwargs)
        self.out_indices = tuple(out_indices)
        self.channels = tuple(self.model.feature_info.channels())
        self.reductions = tuple(self.model.feature_info.reduction())
        if not -1 <= frozen_stages < len(self.channels):
            raise ValueError(f"frozen_stages must be in [-1, {len(self.channels) - 1}], got {frozen_stages}")
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        if checkpoint is not None:
            load_backbone_checkpoint(self.model, checkpoint, model_name)
        self._freeze_stages()

    def init_weights(self) -> None:
        """Keeps the weights as built. timm initialised the model at construction and ``checkpoint``
        was loaded then; mmengine's default recursion would call a wrapped timm model's own
        ``init_weights()`` (the Runner does so before training) and undo both. An explicit
        ``init_cfg`` still applies."""
        if self.init_cfg is None:
            self._is_init = True
            return
        super().init_weights()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model(x))

    def _frozen_parameter_names(self) -> list[str]:
        """Parameters registered up to the last one of the module producing level ``frozen_stages``
        (timm registers stem, then stages in order)."""
        if self.frozen_stages < 0:
            return []
        module_name = self.model.feature_info.module_name()[self.frozen_stages]
        names = [n for n, _ in self.model.named_parameters()]
        candidates = {module_name, module_name.replace(".", "_"), "model." + module_name}
        last = max((i for i, n in enumerate(names) if any(n.startswith(c + ".") for c in candidates)), default=None)
        if last is None:
            raise RuntimeError(f"{self.model_name}: cannot locate the parameters of feature module {module_name!r}")
        return names[: last + 1]

    def _freeze_stages(self) -> None:
        frozen = set(self._frozen_parameter_names())
        for name, p in self.model.named_parameters():
            if name in frozen:
                p.requires_grad_(False)
        self._frozen = frozen

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and getattr(self, "_frozen", None):
            for m in self.model.modules():
                params = list(m.parameters(recurse=False))
                if params and all(not p.requires_grad for p in params):
                    m.eval()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self


def _unwrap(obj) -> Mapping[str, torch.Tensor]:
    for key in _STATE_DICT_KEYS:
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            return _unwrap(obj[key])
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint: expected a state dict, got {type(obj).__name__}")
    return obj


def _strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(state_dict)
    for prefix in _KEY_PREFIXES:
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix):]: v for k, v in out.items()}
    return out


def _source_names(key: str) -> list[str]:
    """Names a features_only model's key can have in the full model's state dict: unchanged, without
    FeatureGetterNet's ``model.`` prefix, or with FeatureListNet's flattened ``stages_0`` -> ``stages.0``."""
    names = [key]
    if key.startswith("model."):
        names.append(key[len("model."):])
    head, _, rest = key.partition(".")
    if "_" in head:
        a, _, b = head.rpartition("_")
        names.append(f"{a}.{b}.{rest}" if rest else f"{a}.{b}")
    return names


def _match(model: nn.Module, source: Mapping[str, torch.Tensor]) -> tuple[dict, list[str]]:
    target = model.state_dict()
    matched, missing = {}, []
    for key, value in target.items():
        for name in _source_names(key):
            if name in source and tuple(source[name].shape) == tuple(value.shape):
                matched[key] = source[name]
                break
        else:
            missing.append(key)
    return matched, missing


def load_backbone_checkpoint(model: nn.Module, path: str | os.PathLike, model_name: str) -> None:
    """Loads a local checkpoint into a timm ``features_only`` model (every backbone tensor must be
    found, with its shape; extra entries such as a classifier are ignored).

    Raises FileNotFoundError for a missing file and ValueError when the checkpoint does not fit.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint: no such file {path!r}")
    source = _strip_prefixes(_unwrap(torch.load(path, map_location="cpu", weights_only=True)))
    matched, missing = _match(model, source)
    how = "timm format"
    if missing:
        # Not this package's format: perhaps the authors' released one.
        try:
            convert = importlib.import_module("ssm2d_vision.convert")
        except ImportError:
            raise ValueError(
                f"checkpoint {path!r} does not fit {model_name}: {len(missing)} of "
                f"{len(model.state_dict())} backbone tensors not found (e.g. {missing[:3]}); converting the "
                f"authors' released checkpoints needs ssm2d_vision.convert, which this installation lacks"
            ) from None
        try:
            released = convert.converter_for(model_name).load_released(path, model_name, strict=True)
        except ValueError as exc:
            raise ValueError(
                f"checkpoint {path!r} does not fit {model_name}: {len(missing)} of {len(model.state_dict())} "
                f"backbone tensors not found (e.g. {missing[:3]}), and it is not a released checkpoint of "
                f"{model_name} either: {exc}") from None
        converted = _strip_prefixes(_unwrap(released))
        matched, missing = _match(model, converted)
        how = "released format, converted"
        if missing:
            raise ValueError(f"checkpoint {path!r} does not fit {model_name} even after conversion from the "
                             f"released format: missing {missing[:5]} ({len(missing)} tensors)")
    model.load_state_dict(matched, strict=True)
    logger.info("loaded %d backbone tensors of %s from %s (%s)", len(matched), model_name, path, how)
