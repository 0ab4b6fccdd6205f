"""A trained model on disk: ``model.pt`` (a plain state dict) and ``model.json`` (its model card) next to it.

The card records what is needed to rebuild the module without the run's config: the model's name and
keyword arguments (:func:`~ssm2d_path.models.build_model`), the feature dimension of the encoder it was
trained on, the number of outputs and what they mean (task, loss, class names, survival bins) and the
encoder's name. Cross-validation writes it into every ``fold_<i>`` folder; :func:`load_trained_model`
reads both files back::

    model, card = load_trained_model("runs/cv/fold_0/model.pt")
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

from ..manifest import write_json_atomic

__all__ = ["CARD_FILE", "ModelCardError", "load_trained_model", "read_model_card", "write_model_card"]

PathLike = Union[str, os.PathLike]
CARD_FILE = "model.json"
CARD_VERSION = 1
TASKS = ("classification", "survival")


class ModelCardError(ValueError):
    """The model card is missing, malformed, or does not match the weights it describes."""


def _plain(v: Any) -> Any:
    """JSON-safe copy of model kwargs (tuples -> lists; anything else exotic -> its repr)."""
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return repr(v)


def write_model_card(directory: PathLike, *, name: str, kwargs: Optional[Mapping] = None, in_dim: int,
                     n_outputs: int, task: str, classes: Optional[Sequence[str]] = None,
                     n_bins: Optional[int] = None, encoder: Optional[str] = None, loss: Optional[str] = None,
                     edges: Optional[Sequence[float]] = None, extra: Optional[Mapping] = None) -> Path:
    """Write ``<directory>/model.json`` atomically and return its path.

    Args:
        name, kwargs: the model as built by ``build_model(name, in_dim, n_outputs, **kwargs)``.
        in_dim: feature dimension of the encoder (F of the features files).
        n_outputs: number of logits.
        task: "classification" or "survival".
        classes: class names in index order (classification).
        n_bins: number of survival time bins (survival, NLL loss).
        encoder: name of the patch encoder the features came from (None when unknown).
        loss: "ce", "nll" or "cox" (what the logits mean: class logits, hazards logits, one log-risk).
        edges: survival bin edges (K + 1,), +inf written as null.
        extra: further provenance (fold, run folder...).
    Raises:
        ValueError naming the argument for an invalid value.
    """
    if task not in TASKS:
        raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
    for arg, v in (("in_dim", in_dim), ("n_outputs", n_outputs)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{arg}: expected a positive int, got {v!r}")
    if classes is not None and len(classes) != n_outputs:
        raise ValueError(f"classes: {len(classes)} names for n_outputs={n_outputs}")
    if loss is None:
        loss = "ce" if task == "classification" else ("cox" if n_outputs == 1 else "nll")
    if loss not in ("ce", "nll", "cox"):
        raise ValueError(f"loss: expected 'ce', 'nll' or 'cox', got {loss!r}")
    card = {"format": "ssm2d-path model card", "version": CARD_VERSION, "name": str(name).lower(),
            "kwargs": _plain(dict(kwargs or {})), "in_dim": int(in_dim), "n_outputs": int(n_outputs),
            "task": task, "loss": loss, "classes": None if classes is None else [str(c) for c in classes],
            "n_bins": None if n_bins is None else int(n_bins), "encoder": encoder,
            "edges": None if edges is None else [float(e) if e != float("inf") else None for e in edges],
            "weights": "model.pt"}
    if extra:
        card["extra"] = _plain(dict(extra))
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    return write_json_atomic(d / CARD_FILE, card)


def read_model_card(path: PathLike) -> dict:
    """Read and check a ``model.json`` (or the card next to a checkpoint given instead).

    Raises:
        ModelCardError naming the file when it is missing, not JSON, or lacks a required key.
    """
    p = Path(path)
    if p.suffix != ".json":
        p = p.parent / CARD_FILE
    if not p.is_file():
        raise ModelCardError(f"{p}: no model card; a run writes model.json next to model.pt (the model's name, "
                             f"kwargs, feature dimension and outputs). For an older run write one with "
                             f"ssm2d_path.models.saved.write_model_card")
    try:
        card = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelCardError(f"{p}: not a readable JSON model card ({e})") from None
    if not isinstance(card, dict):
        raise ModelCardError(f"{p}: expected a JSON object, got {type(card).__name__}")
    missing = [k for k in ("name", "kwargs", "in_dim", "n_outputs", "task") if k not in card]
    if missing:
        raise ModelCardError(f"{p}: model card lacks {', '.join(missing)}")
    if card["task"] not in TASKS:
        raise ModelCardError(f"{p}: task must be one of {TASKS}, got {card['task']!r}")
    card.setdefault("loss", "ce" if card["task"] == "classification" else ("cox" if card["n_outputs"] == 1 else "nll"))
    card.setdefault("classes", None)
    card.setdefault("encoder", None)
    card["path"] = str(p)
    return card


def _state_dict(checkpoint: Path) -> dict:
    from ..train import load_checkpoint

    try:
        state = load_checkpoint(checkpoint)  # weights_only=True; FileNotFoundError when missing
    except FileNotFoundError:
        raise
    except ValueError as e:
        raise ModelCardError(str(e)) from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a training checkpoint (last.pt): its current weights
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelCardError(f"{checkpoint}: expected a state dict of tensors (model.pt or last.pt)")
    return state


def load_trained_model(checkpoint: PathLike, *, device: Union[str, torch.device] = "cpu",
                       card: Optional[Union[PathLike, Mapping]] = None,
                       factory: Optional[Callable] = None) -> tuple[torch.nn.Module, dict]:
    """Rebuild a trained model from ``model.pt`` and its card, in eval mode on ``device``.

    Args:
        checkpoint: ``model.pt`` (plain state dict) or ``last.pt`` (its ``model`` entry).
        card: the card (a mapping or a ``model.json`` path); default ``model.json`` next to the checkpoint.
        factory: ``factory(name, in_dim, n_outputs, **kwargs)`` (default :func:`build_model`).
    Returns:
        (model, card dict).
    Raises:
        FileNotFoundError for a missing checkpoint; ModelCardError naming the file for a missing or
        malformed card, an unknown model, or weights that do not match the card (missing/unexpected keys,
        shapes).
    """
    ckpt = Path(checkpoint)
    if card is None:
        card = read_model_card(ckpt.parent / CARD_FILE)
    elif not isinstance(card, Mapping):
        card = read_model_card(card)
    card = dict(card)
    where = card.get("path", str(ckpt.parent / CARD_FILE))
    if factory is None:
        from . import build_model as factory
    try:
        model = factory(card["name"], int(card["in_dim"]), int(card["n_outputs"]), **dict(card["kwargs"]))
    except (TypeError, ValueError) as e:
        raise ModelCardError(f"{where}: the model card does not describe a buildable model: {e}") from None
    state = _state_dict(ckpt)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelCardError(f"{ckpt}: the weights do not match the model of {where} ({card['name']}, in_dim "
                             f"{card['in_dim']}, n_outputs {card['n_outputs']}): {e}") from None
    return model.to(device).eval(), card
