"""Functional ops (torch.library custom ops with fake kernels and autograd) and their references."""

from .dwconv2d import depthwise_conv2d, depthwise_conv2d_reference
from .layer_norm import layer_norm, layer_norm_kernel_refusal
from .scan2d import scan2d, scan2d_reference
from .star_relu import star_relu, star_relu_reference
from .scan2d_routes import scan2d_routes, scan2d_routes_reference
from .wavefront2d import wavefront2d, wavefront2d_reference

__all__ = ["depthwise_conv2d", "depthwise_conv2d_reference", "layer_norm", "layer_norm_kernel_refusal", "scan2d", "scan2d_reference", "scan2d_routes",
           "scan2d_routes_reference", "star_relu", "star_relu_reference", "wavefront2d", "wavefront2d_reference"]
