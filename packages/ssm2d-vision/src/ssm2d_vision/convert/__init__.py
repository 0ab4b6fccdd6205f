"""Converting released checkpoints to the ssm2d-vision models (one module per model family)."""

from . import m2d

__all__ = ["m2d"]
