"""The CUDA depthwise convolution against float64 PyTorch: forward, dx, dweight, dbias; tile and
plane edges; layouts, autocast, determinism, compile; the 2DMamba layer that uses it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssm2d_nn.ops import depthwise_conv2d

pytestmark = pytest.mark.gpu

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 3e-3), torch.bfloat16: (1e-2, 2e-2)}


def _rel(a, b):
    return float((a.double() - b).norm() / b.norm().clamp_min(1e-30))


def _float64(x, w, b, dy):
    x64, w64 = (t.detach().double().requires_grad_(True) for t in (x, w))
    b64 = None if b is None else b.detach().double().requires_grad_(True)
    k = w.shape[-1]
    y64 = F.conv2d(x64, w64, b64, padding=k // 2, groups=x.shape[1])
    grads = torch.autograd.grad(y64, [x64, w64] + ([b64] if b is not None else []), dy.double())
    return y64.detach(), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [3, 5, 7])
def test_kernel_equals_float64_forward_and_backward(dtype, k):
    # sizes around the 16 x 64 tiles (partial tiles on both sides), single rows and columns
    for shape, with_bias in (((2, 5, 37, 130), True), ((1, 3, 1, 1), False), ((3, 2, 16, 64), True),
                             ((1, 4, 70, 3), False), ((2, 1, 1, 200), True)):
        c = shape[1]
        x = torch.randn(shape, device="cuda").to(dtype).requires_grad_(True)
        w = (torch.randn(c, 1, k, k, device="cuda") / k).requires_grad_(True)
        b = torch.randn(c, device="cuda").requires_grad_(True) if with_bias else None
        dy = torch.randn(shape, device="cuda").to(dtype)
        y = depthwise_conv2d(x, w, b, backend="kernel")
        grads = torch.autograd.grad(y, [x, w] + ([b] if b is not None else []), dy)
        y64, ref = _float64(x, w, b, dy)
        ftol, gtol = TOL[dtype]
        ctx = f"{dtype} k={k} {shape}"
        assert y.dtype == dtype and y.shape == x.shape and grads[0].dtype == dtype and grads[1].dtype == w.dtype, ctx
        assert _rel(y, y64) < ftol, f"y {ctx}: {_rel(y, y64):.2e}"
        for name, a, r in zip(("dx", "dweight", "dbias"), grads, ref):
            assert _rel(a, r) < gtol, f"{name} {ctx}: {_rel(a, r):.2e}"


def test_many_planes_layouts_determinism_autocast_and_refusals():
    # more than 65535 (batch, channel) planes: the launches are split
    x = torch.randn(2, 40000, 3, 5, device="cuda", requires_grad=True)
    w = torch.randn(40000, 1, 3, 3, device="cuda", requires_grad=True)
    dy = torch.randn_like(x)
    y = depthwise_conv2d(x, w, backend="kernel")
    gx, gw = torch.autograd.grad(y, [x, w], dy)
    y64, (rx, rw) = _float64(x, w, None, dy)
    assert _rel(y, y64) < 1e-5 and _rel(gx, rx) < 1e-5 and _rel(gw, rw) < 1e-5
    # bitwise repeatable gradients (fixed summation order)
    x = torch.randn(2, 16, 100, 90, device="cuda", requires_grad=True)
    w = torch.randn(16, 1, 3, 3, device="cuda", requires_grad=True)
    b = torch.randn(16, device="cuda", requires_grad=True)
    dy = torch.randn_like(x)
    runs = [torch.autograd.grad(depthwise_conv2d(x, w, b, backend="kernel"), [x, w, b], dy) for _ in range(2)]
    for a, c in zip(*runs):
        assert torch.equal(a, c)
    # channels-last: "auto" leaves it to cuDNN, "kernel" copies it; both the float64 value
    xc = x.detach().contiguous(memory_format=torch.channels_last)
    y64, _ = _float64(xc, w, b, dy)
    for backend in ("auto", "kernel"):
        assert _rel(depthwise_conv2d(xc, w, b, backend=backend), y64) < 1e-5, backend
    # autocast: a float32 x runs in bfloat16 as F.conv2d would, the parameters stay float32
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ya = depthwise_conv2d(x, w, b, backend="kernel")
    assert ya.dtype == torch.bfloat16 and _rel(ya, F.conv2d(x.double(), w.double(), b.double(), padding=1, groups=16)) < 1e-2
    # what the kernel cannot take: refused by name under "kernel", F.conv2d under "auto"
    from ssm2d_nn.backends import BackendUnavailableError
    w2 = torch.randn(16, 1, 3, 5, device="cuda")
    with pytest.raises(BackendUnavailableError, match="3x3, 5x5 or 7x7"):
        depthwise_conv2d(x, w2, backend="kernel")
    assert _rel(depthwise_conv2d(x, w2), F.conv2d(x.double(), w2.double(), padding=(1, 2), groups=16)) < 1e-5


def test_compiled_equals_eager():
    x = torch.randn(2, 8, 20, 30, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(8, 1, 5, 5, device="cuda", requires_grad=True)
    b = torch.randn(8, device="cuda", requires_grad=True)
    dy = torch.randn_like(x)
    f = torch.compile(lambda x, w, b: depthwise_conv2d(x, w, b, backend="kernel"), fullgraph=True, backend="aot_eager")
    eager = torch.autograd.grad(depthwise_conv2d(x, w, b, backend="kernel"), [x, w, b], dy)
    comp = torch.autograd.grad(f(x, w, b), [x, w, b], dy)
    for a, c in zip(eager, comp):
        assert torch.equal(a, c)


def test_2dmamba_layer_with_the_kernel_equals_float64():
    # the MIL layer (plain and channel-chunked paths) with the convolution kernel, against the
    # same layer in float64 on the reference backend
    from ssm2d_nn.layers import TwoDMambaLayer

    torch.manual_seed(0)
    for checkpoint in (False, True):
        layer = TwoDMambaLayer(16, d_state=8, checkpoint=checkpoint, chunk_channels=8 if checkpoint else None).cuda()
        x = torch.randn(1, 16, 23, 70, device="cuda", requires_grad=True)
        y = layer(x)
        gx, gw = torch.autograd.grad(y.square().sum(), [x, layer.conv.weight])
        ref = TwoDMambaLayer(16, d_state=8, backend="reference", checkpoint=False).double().cuda()
        ref.load_state_dict(layer.state_dict())
        x64 = x.detach().double().requires_grad_(True)
        y64 = ref(x64)
        rx, rw = torch.autograd.grad(y64.square().sum(), [x64, ref.conv.weight])
        assert _rel(y, y64) < 1e-4 and _rel(gx, rx) < 1e-3 and _rel(gw, rw) < 1e-3, checkpoint
