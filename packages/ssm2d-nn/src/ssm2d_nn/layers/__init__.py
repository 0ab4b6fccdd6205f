"""Modules built on the ops: the SS2D mixer of VMamba / 2DVMamba."""

from .ss2d import SS2D

__all__ = ["SS2D"]
