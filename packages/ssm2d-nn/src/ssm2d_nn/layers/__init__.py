"""nn.Module layers built on the ssm2d ops."""

from .m2d import M2DMixer, RoPEAttention2d, SepConvLocal, StarReLU

__all__ = ["M2DMixer", "RoPEAttention2d", "SepConvLocal", "StarReLU"]
