"""depthwise_conv2d on the CPU: the argument checks, the backend choice, and its value against a
float64 sum over the kernel taps written out (the CUDA kernel: test_dwconv2d_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from ssm2d_nn.backends import BackendUnavailableError
from ssm2d_nn.ops import depthwise_conv2d


def _taps(x, w, b):
    """y[b,c,i,j] = sum_{p,q} w[c,0,p,q] x[b,c,i+p-P,j+q-Q] + bias[c], zero outside: shifted copies."""
    kh, kw = w.shape[-2:]
    ph, pw = kh // 2, kw // 2
    xp = torch.nn.functional.pad(x, (pw, pw, ph, ph))
    h, wd = x.shape[-2:]
    y = torch.zeros_like(x)
    for p in range(kh):
        for q in range(kw):
            y += w[:, 0, p, q].view(1, -1, 1, 1) * xp[:, :, p:p + h, q:q + wd]
    return y if b is None else y + b.view(1, -1, 1, 1)


@pytest.mark.parametrize("k", [(3, 3), (5, 5), (7, 7), (3, 5)])
def test_cpu_value_and_gradients_equal_the_tap_sum(k):
    x = torch.randn(2, 4, 9, 13, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 1, *k, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    y = depthwise_conv2d(x, w, b)
    r = _taps(x, w, b)
    assert torch.allclose(y, r, atol=1e-12)
    dy = torch.randn_like(y)
    for a, c in zip(torch.autograd.grad(y, [x, w, b], dy), torch.autograd.grad(r, [x, w, b], dy)):
        assert torch.allclose(a, c, atol=1e-11)


def test_bad_arguments_are_refused_by_name():
    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(ValueError, match="x must have shape"):
        depthwise_conv2d(x[0], torch.randn(4, 1, 3, 3))
    with pytest.raises(ValueError, match="weight must have shape"):
        depthwise_conv2d(x, torch.randn(3, 1, 3, 3))
    with pytest.raises(ValueError, match="odd sizes"):
        depthwise_conv2d(x, torch.randn(4, 1, 2, 3))
    with pytest.raises(ValueError, match="bias must have shape"):
        depthwise_conv2d(x, torch.randn(4, 1, 3, 3), torch.randn(5))
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        depthwise_conv2d(x, [[1.0]])
    # the kernel runs on CUDA only: "kernel" says so, "auto" runs F.conv2d
    with pytest.raises(BackendUnavailableError, match="CUDA only"):
        depthwise_conv2d(x, torch.randn(4, 1, 3, 3), backend="kernel")
    with pytest.raises(ValueError, match="backend"):
        depthwise_conv2d(x, torch.randn(4, 1, 3, 3), backend="fast")


def test_auto_leaves_small_planes_and_channels_last_to_pytorch_and_kernel_takes_them():
    from ssm2d_nn.ops.dwconv2d import _decide

    # (decided before the device is looked at: these hold on a machine without a GPU too)
    assert _decide("auto", "cuda", 0, torch.bfloat16, 3, 3, True, True) == "reference"  # a 14 x 14 plane
    assert _decide("auto", "cuda", 0, torch.bfloat16, 3, 3, False, False) == "reference"  # channels-last
    assert _decide("auto", "cuda", 0, torch.bfloat16, 3, 5, True, False) == "reference"  # not square
    assert _decide("auto", "cuda", 0, torch.float64, 3, 3, True, False) == "reference"
    with pytest.raises(BackendUnavailableError, match="3x3, 5x5 or 7x7"):
        _decide("kernel", "cuda", 0, torch.bfloat16, 9, 9, True, False)
