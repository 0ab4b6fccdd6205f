"""MIL models: a :class:`~ssm2d_path.bag.Bag` in, an :class:`MILOutput` (bag logits, per-patch scores) out.

``build_model(name, in_dim, n_outputs, **kwargs)`` builds one by name (see ``MODEL_NAMES``).
"""

from __future__ import annotations

from .base import MILModel, MILOutput
from .mamba import M2DMIL, MambaMIL, TwoDMambaMIL
from .params import param_groups
from .simple import ABMIL, MaxMIL, MeanMIL
from .transmil import TransMIL

__all__ = ["ABMIL", "M2DMIL", "MILModel", "MILOutput", "MODEL_NAMES", "MambaMIL", "MaxMIL", "MeanMIL", "TransMIL",
           "TwoDMambaMIL", "build_model", "param_groups"]

_REGISTRY = {
    "2dmambamil": TwoDMambaMIL,
    "m2dmil": M2DMIL,
    "mambamil": MambaMIL,
    "abmil": ABMIL,
    "transmil": TransMIL,
    "mean": MeanMIL,
    "max": MaxMIL,
}
MODEL_NAMES = tuple(_REGISTRY)


def build_model(name: str, in_dim: int, n_outputs: int, **kwargs) -> MILModel:
    """The model called ``name`` (one of MODEL_NAMES, case-insensitive) with its keyword arguments
    (e.g. dim, dropout, backend for the scan models). Raises ValueError for an unknown name or
    non-positive sizes, TypeError for an argument the model does not take."""
    key = name.lower() if isinstance(name, str) else name
    if key not in _REGISTRY:
        raise ValueError(f"build_model: unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}")
    for arg, v in (("in_dim", in_dim), ("n_outputs", n_outputs)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"build_model: {arg} must be a positive int, got {v!r}")
    cls = _REGISTRY[key]
    try:
        return cls(in_dim, n_outputs, **kwargs)
    except TypeError as e:
        raise TypeError(f"build_model({name!r}): {e}") from e
