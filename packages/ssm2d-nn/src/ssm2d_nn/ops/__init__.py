"""Functional ops (torch.library custom ops with fake kernels and autograd) and their references."""

from .scan2d import scan2d, scan2d_reference
from .scan2d_routes import scan2d_routes, scan2d_routes_reference
from .wavefront2d import wavefront2d, wavefront2d_reference

__all__ = ["scan2d", "scan2d_reference", "scan2d_routes", "scan2d_routes_reference", "wavefront2d",
           "wavefront2d_reference"]
