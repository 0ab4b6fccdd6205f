"""timm model definitions; importing this package registers them with timm."""

from . import vmamba
from .vmamba import VMamba

__all__ = ["VMamba", "vmamba"]
