"""One YAML config for a run, validated into dataclasses.

Sections ``data``, ``model``, ``train``, ``output`` and the slide pipeline's ``slides``, ``patch``,
``extract``, ``heatmap`` (:mod:`ssm2d_path.wsi.settings`). Every key is checked: an unknown key fails with
its full path and the allowed keys, a value of the wrong type or outside its choices fails naming the
key. ``model`` holds ``name`` plus the model's constructor arguments, checked against the signature of
the model class (``in_dim`` and ``n_outputs`` come from the data and the task). Command-line overrides
(``--set train.epochs=5``) are applied to the raw mapping before validation; their values are parsed as
YAML (``5`` is an int, ``1e-4`` a float, ``[1, 2]`` a list, ``null`` None); a Python object tag
(``!!python/...``) is refused.

Values are range-checked: every number finite (YAML reads ``.nan`` and ``.inf`` as floats), ``train.lr``
> 0 and ``min_lr <= lr``, sizes >= 1, rates in their interval; model arguments against the constructor's
annotations (sizes positive integers, dropout rates in [0, 1)). Whether ``train.device`` exists on this
machine is checked when a run starts (:func:`ssm2d_path.train.check_device`), as is the model (built once).

Example::

    data:
      feature_dir: features/20x_256px_0px_overlap/features_uni_v1
      label_csv: labels.csv
      task: classification
      k: 5
    model: {name: 2dmambamil, dropout: 0.25}
    train: {epochs: 20, lr: 1.0e-4, selection: val_auc}
    output: {dir: runs/brca}
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .wsi.settings import ExtractConfig, HeatmapConfig, PatchConfig, SlidesConfig

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OutputConfig",
    "TrainConfig",
    "apply_overrides",
    "load_config",
    "parse_config",
]


class ConfigError(ValueError):
    """A config key is unknown, missing, of the wrong type or out of range; the message names the key."""


@dataclass
class DataConfig:
    """Where the bags and labels come from and how they are split."""

    feature_dir: Optional[str] = None
    label_csv: Optional[str] = None
    format: Literal["auto", "clam", "trident", "stamp"] = "auto"
    patches_dir: Optional[str] = None
    task: Literal["classification", "survival"] = "classification"
    level: Literal["slide", "patient"] = "slide"
    label_col: str = "label"
    time_col: str = "survival_months"
    censorship_col: str = "censorship"
    event_col: Optional[str] = None
    label_map: Optional[dict] = None
    split_dir: Optional[str] = None
    k: int = 5
    seed: int = 0
    val_fraction: float = 0.15
    n_bins: int = 4
    skip_bad_files: bool = False  # leave out unusable feature files (recorded) instead of refusing the run
    max_grid_cells: int = 4_194_304  # a slide whose tissue-cropped grid (rows x cols) is larger is refused


@dataclass
class ModelConfig:
    """``name`` (one of ``ssm2d_path.models.MODEL_NAMES``) and the model's own keyword arguments."""

    name: str = "2dmambamil"
    kwargs: dict = field(default_factory=dict)


@dataclass
class TrainConfig:
    """Training settings. ``recipe`` names the set of defaults (:mod:`ssm2d_path.recipes`) that the keys
    not given in the config take; the keys given always win."""

    epochs: int = 40
    lr: float = 2e-3
    weight_decay: float = 1e-2
    accumulation: int = 1
    scheduler: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: float = 1.0
    min_lr: float = 0.0
    selection: Literal["auto", "val_auc", "val_loss", "val_cindex", "last"] = "val_loss"
    loss: Literal["auto", "ce", "nll", "cox"] = "auto"
    alpha: float = 0.0
    max_grad_norm: Optional[float] = None
    patience: Optional[int] = 15  # early stopping: epochs without a better selection score (null: off)
    min_epochs: int = 20  # never stop early before this epoch
    dihedral: bool = True  # augmentation: a random flip / 90-degree rotation of each training slide's grid
    crop: float = 1.0  # augmentation: keep a random window of at least this fraction of each grid side (1: off)
    feature_noise: float = 0.0  # augmentation: Gaussian noise, std as a fraction of the per-dimension std (0: off)
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    recipe: str = "default"  # the named defaults of the keys not given (ssm2d_path.recipes): default | paper


@dataclass
class OutputConfig:
    dir: str = "runs/ssm2d-path"


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    slides: SlidesConfig = field(default_factory=SlidesConfig)
    patch: PatchConfig = field(default_factory=PatchConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    heatmap: HeatmapConfig = field(default_factory=HeatmapConfig)

    def to_dict(self) -> dict:
        """Plain mapping in the YAML layout (model kwargs flattened next to ``name``)."""
        d = dataclasses.asdict(self)
        d["model"] = {"name": self.model.name, **self.model.kwargs}
        return d

    def resolved_selection(self) -> str:
        """``auto`` -> val_auc (classification) / val_cindex (survival)."""
        if self.train.selection != "auto":
            return self.train.selection
        return "val_auc" if self.data.task == "classification" else "val_cindex"


_SECTIONS = {"data": DataConfig, "train": TrainConfig, "output": OutputConfig, "slides": SlidesConfig,
             "patch": PatchConfig, "extract": ExtractConfig, "heatmap": HeatmapConfig}


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, key: str):
    """Check ``value`` against annotation ``tp``; ints are accepted for floats. Raises ConfigError."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: expected one of {_type_name(tp)}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null, got {value!r}")
        return None
    if tp is float:
        if isinstance(value, str):
            # PyYAML reads YAML 1.1, where "1e-4" (no dot) is a string: accept what float() parses.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    if tp is list or origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return list(value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - schema bug


def _section(cls, raw: Any, name: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls)]
    kw = {}
    for key, value in raw.items():
        if key not in allowed:
            raise ConfigError(f"{name}.{key}: unknown key; allowed keys of {name}: {', '.join(allowed)}")
        kw[key] = _coerce(value, hints[key], f"{name}.{key}")
    return cls(**kw)


def model_class(name: str):
    """The model class registered under ``name`` (from ``ssm2d_path.models``)."""
    from . import models

    names = getattr(models, "MODEL_NAMES", ())
    if name not in names:
        raise ConfigError(f"model.name: unknown model {name!r}; allowed: {', '.join(names)}")
    registry = getattr(models, "MODEL_CLASSES", None)
    if registry is None:
        registry = {"2dmambamil": "TwoDMambaMIL", "m2dmil": "M2DMIL", "mambamil": "MambaMIL", "abmil": "ABMIL",
                    "transmil": "TransMIL", "mean": "MeanMIL", "max": "MaxMIL"}
        return getattr(models, registry[name])
    return registry[name]


def _constructor_keys(cls) -> Optional[list[str]]:
    """Keyword names the constructor of ``cls`` accepts, following ``**kwargs`` up the MRO to the base
    class that receives them; None when they end in a constructor that takes anything."""
    keys: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        if klass.__module__.startswith("torch."):
            return None if not keys else keys  # nn.Module takes no keyword arguments of its own
        params = list(inspect.signature(klass.__init__).parameters.values())[1:]
        for p in params:
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY) \
                    and p.name not in keys:
                keys.append(p.name)
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return keys
    return None


def _constructor_hints(cls) -> dict:
    """Annotation of each constructor argument along the ``**kwargs`` chain (first one found wins)."""
    hints: dict = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass.__module__.startswith("torch."):
            continue
        try:
            found = typing.get_type_hints(klass.__init__)
        except Exception:  # noqa: BLE001 - unresolvable annotations: no type checks for that class
            found = {}
        for k, v in found.items():
            hints.setdefault(k, v)
    return hints


def _accepts(tp, kind) -> bool:
    return tp is kind or (typing.get_origin(tp) in (Union, types.UnionType) and kind in typing.get_args(tp))


def _check_model_value(key: str, value: Any, tp) -> None:
    """Type and range of one model argument: numbers finite, sizes (int arguments) >= 1, dropout rates
    in [0, 1)."""
    where = f"model.{key}"
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: must be a finite number, got {value!r}")
    if "drop" in key and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{where}: a dropout rate must be in [0, 1), got {value!r}")
        return
    if tp is None:
        return
    if isinstance(value, bool):
        if not _accepts(tp, bool):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return
    if isinstance(value, int) and _accepts(tp, int):
        if value < 1:
            raise ConfigError(f"{where}: a size must be a positive integer, got {value!r}")
        return
    if isinstance(value, (int, float)) and not _accepts(tp, float) and _accepts(tp, int):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")


def check_model_kwargs(name: str, kwargs: dict, cls=None) -> None:
    """Reject keyword arguments the model's constructor does not take (``in_dim``/``n_outputs`` are
    set by the run), and values of the wrong type or out of range (non-finite numbers, sizes < 1,
    dropout outside [0, 1)). Raises ConfigError naming ``model.<key>``."""
    cls = cls or model_class(name)
    for key in kwargs:
        if key in ("in_dim", "n_outputs"):
            raise ConfigError(f"model.{key}: set by the run (feature dimension / task), do not give it")
    keys = _constructor_keys(cls)
    if keys is not None:
        allowed = [k for k in keys if k not in ("in_dim", "n_outputs")]
        for key in kwargs:
            if key not in allowed:
                raise ConfigError(f"model.{key}: unknown argument of {cls.__name__}; allowed keys of model: "
                                  f"name, {', '.join(allowed)}")
    hints = _constructor_hints(cls)
    for key, value in kwargs.items():
        _check_model_value(key, value, hints.get(key))


def parse_config(raw: Any, *, check_model: bool = True) -> Config:
    """Validate a raw mapping (as loaded from YAML) into a :class:`Config`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(raw).__name__}")
    allowed = ["data", "model", "train", "output", "slides", "patch", "extract", "heatmap"]
    for key in raw:
        if key not in allowed:
            raise ConfigError(f"{key}: unknown section; allowed sections: {', '.join(allowed)}")
    raw = _with_recipe(raw)
    cfg = Config(**{k: _section(cls, raw.get(k), k) for k, cls in _SECTIONS.items()})
    m = raw.get("model") or {}
    if not isinstance(m, dict):
        raise ConfigError(f"model: expected a mapping, got {type(m).__name__}")
    m = dict(m)
    name = m.pop("name", ModelConfig.name)
    if not isinstance(name, str):
        raise ConfigError(f"model.name: expected a string, got {name!r}")
    cfg.model = ModelConfig(name=name.lower(), kwargs=m)
    if check_model:
        check_model_kwargs(cfg.model.name, cfg.model.kwargs)
    _check_values(cfg)
    return cfg


def _model_accepts(name: str, key: str) -> bool:
    try:
        keys = _constructor_keys(model_class(name))
    except ConfigError:
        return False  # the model check reports the unknown name
    return keys is None or key in keys


def _with_recipe(raw: dict) -> dict:
    """``raw`` with the values of its ``train.recipe`` (:mod:`ssm2d_path.recipes`) where it gives none."""
    from .recipes import apply_recipe

    recipe = (raw.get("train") or {}).get("recipe") if isinstance(raw.get("train"), dict) else None
    if recipe is not None and not isinstance(recipe, str):
        raise ConfigError(f"train.recipe: expected a string, got {type(recipe).__name__} {recipe!r}")
    try:
        return apply_recipe(raw, accepts=_model_accepts)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_finite(cfg: Config) -> None:
    """Every number of every section is finite (YAML reads ``.nan`` and ``.inf`` as floats)."""
    for name in ("data", "train", "output", "slides", "patch", "extract", "heatmap"):
        for f in dataclasses.fields(getattr(cfg, name)):
            v = getattr(getattr(cfg, name), f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{name}.{f.name}: must be a finite number, got {v!r}")


def _check_values(cfg: Config) -> None:
    _check_finite(cfg)
    for name in ("slides", "patch", "extract", "heatmap"):
        try:
            getattr(cfg, name).check()
        except ValueError as e:
            raise ConfigError(f"{name}.{e}") from None
    d, t = cfg.data, cfg.train
    for key, v, lo in (("data.k", d.k, 2), ("data.n_bins", d.n_bins, 1), ("train.epochs", t.epochs, 1),
                       ("train.accumulation", t.accumulation, 1), ("data.max_grid_cells", d.max_grid_cells, 1)):
        if v < lo:
            raise ConfigError(f"{key}: must be >= {lo}, got {v}")
    if not 0.0 <= d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction: must be in [0, 1), got {d.val_fraction}")
    if t.lr <= 0:
        raise ConfigError(f"train.lr: must be > 0, got {t.lr}")
    for key in ("weight_decay", "warmup_epochs", "min_lr"):
        if getattr(t, key) < 0:
            raise ConfigError(f"train.{key}: must be >= 0, got {getattr(t, key)}")
    if t.min_lr > t.lr:
        raise ConfigError(f"train.min_lr: must be <= train.lr ({t.lr}), got {t.min_lr}")
    if t.patience is not None and t.patience < 1:
        raise ConfigError(f"train.patience: must be >= 1 (or null for no early stopping), got {t.patience}")
    if t.min_epochs < 1:
        raise ConfigError(f"train.min_epochs: must be >= 1, got {t.min_epochs}")
    if not 0.0 < t.crop <= 1.0:
        raise ConfigError(f"train.crop: must be in (0, 1] (1 keeps the whole grid), got {t.crop}")
    if t.feature_noise < 0:
        raise ConfigError(f"train.feature_noise: must be >= 0, got {t.feature_noise}")
    if t.max_grad_norm is not None and t.max_grad_norm <= 0:
        raise ConfigError(f"train.max_grad_norm: must be > 0 (or null for no clipping), got {t.max_grad_norm}")
    if not 0.0 <= t.alpha <= 1.0:
        raise ConfigError(f"train.alpha: must be in [0, 1], got {t.alpha}")
    if d.task == "classification":
        if t.loss not in ("auto", "ce"):
            raise ConfigError(f"train.loss: classification takes 'ce' (or auto), got {t.loss!r}")
        if t.selection == "val_cindex":
            raise ConfigError("train.selection: val_cindex is for survival; use val_auc, val_loss or last")
    else:
        if t.loss == "ce":
            raise ConfigError("train.loss: survival takes 'nll' or 'cox' (or auto), got 'ce'")
        if t.selection == "val_auc":
            raise ConfigError("train.selection: val_auc is for classification; use val_cindex, val_loss or last")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", t.device):
        raise ConfigError(f"train.device: expected 'auto', 'cpu', 'cuda' or 'cuda:<i>', got {t.device!r}")


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings (value parsed as YAML) to a raw config mapping (copied)."""
    import copy

    raw = copy.deepcopy(raw) if raw else {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        path, _, text = item.partition("=")
        keys = [k for k in path.strip().split(".") if k]
        if len(keys) < 2:
            raise ConfigError(f"--set {item!r}: expected section.key=value (e.g. train.epochs=5)")
        node = raw
        for k in keys[:-1]:
            nxt = node.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item!r}: {k} is not a section")
            node = nxt
        try:
            node[keys[-1]] = yaml.safe_load(text)
        except yaml.YAMLError as e:
            what = ("a Python object tag (!!python/...) is not a value; give plain YAML (numbers, strings, "
                    "lists, mappings)" if "python" in str(e) else f"not valid YAML ({' '.join(str(e).split())})")
            raise ConfigError(f"--set {item!r}: {what}") from None
    return raw


def load_config(path, overrides: Optional[list[str]] = None, *, check_model: bool = True) -> Config:
    """Read a YAML config file, apply overrides, validate. Relative paths in ``data`` stay as written
    (relative to the working directory)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    return parse_config(apply_overrides(raw or {}, overrides or []), check_model=check_model)
