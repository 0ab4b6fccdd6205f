"""nn.Module layers built on the ssm2d ops: VMamba's SS2D, the 2DMamba layer, the M2D mixer and its attention."""

from .conv1x1 import Conv1x1, Mlp1x1
from .m2d import M2DMixer, RoPEAttention2d, SepConvLocal, StarReLU
from .mamba2d import TwoDMambaLayer
from .ss2d import SS2D

__all__ = ["Conv1x1", "M2DMixer", "Mlp1x1", "RoPEAttention2d", "SS2D", "SepConvLocal", "StarReLU", "TwoDMambaLayer"]
