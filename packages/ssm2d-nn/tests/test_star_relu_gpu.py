"""The CUDA StarReLU kernel against float64 PyTorch: forward, dx, dscale, dbias; layouts; compile."""

from __future__ import annotations

import pytest
import torch

from ssm2d_nn.layers import StarReLU
from ssm2d_nn.ops import star_relu, star_relu_reference

pytestmark = pytest.mark.gpu

TOL = {torch.float32: (1e-6, 1e-5), torch.float16: (1e-3, 3e-3), torch.bfloat16: (8e-3, 2e-2)}


def _rel(a, b):
    return float((a.double() - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_equals_float64_forward_and_backward(dtype):
    for n in (1, 7, 4096 + 3, 3 * 56 * 56 * 128):  # tails that are not a whole 16-byte vector
        x = (torch.randn(n, device="cuda") * 2).to(dtype).requires_grad_(True)
        s = (torch.rand(1, device="cuda") + 0.5).requires_grad_(True)
        b = torch.randn(1, device="cuda").requires_grad_(True)
        dy = torch.randn(n, device="cuda").to(dtype)
        y = star_relu(x, s, b, backend="kernel")
        gx, gs, gb = torch.autograd.grad(y, [x, s, b], dy)
        x64, s64, b64 = (t.detach().double().requires_grad_(True) for t in (x, s, b))
        y64 = s64 * torch.relu(x64) ** 2 + b64
        rx, rs, rb = torch.autograd.grad(y64, [x64, s64, b64], dy.double())
        ftol, gtol = TOL[dtype]
        ctx = f"{dtype} n={n}"
        assert y.dtype == dtype and gx.dtype == dtype and gs.shape == (1,) and gb.shape == (1,), ctx
        assert _rel(y, y64) < ftol, f"y {ctx}: {_rel(y, y64):.2e}"
        for name, a, r in (("dx", gx, rx), ("dscale", gs, rs), ("dbias", gb, rb)):
            assert _rel(a, r) < gtol, f"{name} {ctx}: {_rel(a, r):.2e}"


def test_layouts_determinism_and_the_layer():
    # a channels-last activation (what the depthwise conv returns) keeps its strides, no copy
    x = torch.randn(4, 64, 9, 11, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    xv = x.permute(0, 2, 3, 1)
    s, b = torch.tensor([0.8], device="cuda"), torch.tensor([-0.1], device="cuda")
    y = star_relu(xv, s, b, backend="kernel")
    assert y.stride() == xv.stride()
    assert _rel(y, 0.8 * torch.relu(xv.double()) ** 2 - 0.1) < 8e-3
    # a non-dense view (every other column) is copied and still right
    xs = torch.randn(33, 40, device="cuda")[:, ::2]
    assert _rel(star_relu(xs, s, b, backend="kernel"), 0.8 * torch.relu(xs.double()) ** 2 - 0.1) < 1e-6
    # bitwise repeatable gradients (fixed summation order)
    act = StarReLU().cuda()
    xg = torch.randn(2, 28, 28, 256, device="cuda", requires_grad=True)
    dy = torch.randn_like(xg)
    runs = [torch.autograd.grad(act(xg), [xg, act.scale, act.bias], dy) for _ in range(2)]
    for a, c in zip(*runs):
        assert torch.equal(a, c)
    # the layer under autocast: bf16 out, the reference formula's value
    with torch.autocast("cuda", dtype=torch.bfloat16):
        yl = act(xg.bfloat16())
    assert yl.dtype == torch.bfloat16
    # against the formula on the same bf16-rounded input: only the output's rounding differs
    x_in = xg.detach().bfloat16().double()
    assert _rel(yl, star_relu_reference(x_in, act.scale.double(), act.bias.double())) < 8e-3


def test_compiled_star_relu_equals_eager():
    x = torch.randn(3, 20, 20, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    s = torch.tensor([1.3], device="cuda", requires_grad=True)
    b = torch.tensor([0.2], device="cuda", requires_grad=True)
    fn = torch.compile(lambda x, s, b: star_relu(x, s, b, backend="kernel"), fullgraph=True)
    dy = torch.randn_like(x)
    y_c = fn(x, s, b)
    g_c = torch.autograd.grad(y_c, [x, s, b], dy)
    y_e = star_relu(x, s, b, backend="kernel")
    g_e = torch.autograd.grad(y_e, [x, s, b], dy)
    assert torch.equal(y_c, y_e)
    for a, c in zip(g_c, g_e):
        assert torch.equal(a, c)
