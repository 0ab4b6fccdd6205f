"""nn.Module layers built on the ops."""

from .mamba2d import TwoDMambaLayer

__all__ = ["TwoDMambaLayer"]
