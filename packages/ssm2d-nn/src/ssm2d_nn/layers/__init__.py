"""nn.Module layers built on the ssm2d ops: the 2DMamba layer, the M2D mixer and its attention."""

from .m2d import M2DMixer, RoPEAttention2d, SepConvLocal, StarReLU
from .mamba2d import TwoDMambaLayer

__all__ = ["M2DMixer", "RoPEAttention2d", "SepConvLocal", "StarReLU", "TwoDMambaLayer"]
