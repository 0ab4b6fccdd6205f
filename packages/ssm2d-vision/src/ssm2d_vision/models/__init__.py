"""timm model definitions (one module per family); importing this package registers them with timm."""

from . import m2d, vmamba
from .m2d import Mamba2D
from .vmamba import VMamba

__all__ = ["Mamba2D", "VMamba", "m2d", "vmamba"]
