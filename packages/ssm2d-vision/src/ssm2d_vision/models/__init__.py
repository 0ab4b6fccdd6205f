"""timm models of ssm2d-vision; importing this module registers them with timm."""

from . import m2d
from .m2d import Mamba2D

__all__ = ["Mamba2D", "m2d"]
