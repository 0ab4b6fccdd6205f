"""SS2D (VMamba v2 / 2DVMamba mixer): the fast path against a float64 reference written like the
released code (explicit cross-scan copies, flips and transposes, one reference scan per route)."""

from __future__ import annotations

import pytest
import torch

from ssm2d_nn.layers import SS2D
from ssm2d_nn.layers.ss2d import ss2d_reference


def _randomised(module: SS2D, seed: int) -> SS2D:
    """Perturbs every parameter so no route, norm or bias sits at a symmetric initial value, with
    dt around 1 and a small D so the scans (not the D skip) dominate the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        module.dt_projs_bias.copy_(0.5 + 0.5 * torch.randn(module.dt_projs_bias.shape, generator=g))
        module.Ds.mul_(0.1)
    return module


@pytest.mark.parametrize("scan", ["cross1d", "2d"])
@pytest.mark.parametrize("hw", [(5, 7), (6, 6), (1, 9), (8, 1)])
def test_forward_matches_float64_reference(scan, hw):
    torch.manual_seed(hash((scan, hw)) % 1000)
    m = _randomised(SS2D(12, d_state=2, ssm_ratio=1.5, scan=scan), seed=1)
    x = torch.randn(2, 12, *hw)
    ref = ss2d_reference(m, x)
    assert ref.dtype == torch.float64
    out = m(x)
    assert out.shape == x.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    out64 = m.double()(x.double())
    torch.testing.assert_close(out64, ref, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("scan", ["cross1d", "2d"])
def test_backward_kernel_matches_reference_backend(scan):
    torch.manual_seed(3)
    m = _randomised(SS2D(8, d_state=1, ssm_ratio=2.0, scan=scan), seed=2).double()
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    grads = {}
    for backend in ("kernel", "reference"):
        m.backend = backend
        m.zero_grad()
        xi = x.clone().requires_grad_(True)
        (m(xi) * torch.linspace(-1, 1, xi.numel(), dtype=xi.dtype).view_as(xi)).sum().backward()
        grads[backend] = {"x": xi.grad.clone(), **{n: p.grad.clone() for n, p in m.named_parameters()}}
    for name, g in grads["kernel"].items():
        torch.testing.assert_close(g, grads["reference"][name], rtol=1e-9, atol=1e-11, msg=name)
        assert g.abs().sum() > 0, name


def test_2d_differs_from_cross1d_with_the_same_parameters():
    torch.manual_seed(0)
    a = _randomised(SS2D(8, scan="cross1d"), seed=4)
    b = SS2D(8, scan="2d")
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 8, 6, 6)
    ya, yb = a(x), b(x)
    assert (ya - yb).abs().max() > 1e-2 * ya.abs().max()
    # ... and each equals its own reference, so the difference is the scans, not a bug in one path.
    torch.testing.assert_close(yb.double(), ss2d_reference(b, x), rtol=1e-4, atol=1e-5)


def test_parameters_as_released():
    c, ratio, n = 40, 2.0, 3
    m = SS2D(c, d_state=n, ssm_ratio=ratio)
    d, r = int(ratio * c), 3  # R = ceil(40 / 16)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "in_proj.weight": (d, c, 1, 1), "conv2d.weight": (d, 1, 3, 3), "x_proj_weight": (4, r + 2 * n, d),
        "dt_projs_weight": (4, d, r), "dt_projs_bias": (4, d), "A_logs": (4 * d, n), "Ds": (4 * d,),
        "out_norm.weight": (d,), "out_norm.bias": (d,), "out_proj.weight": (c, d, 1, 1),
    }
    torch.testing.assert_close(m.A_logs, torch.log(torch.arange(1.0, n + 1)).repeat(4 * d, 1))
    assert torch.all(m.Ds == 1)
    dt = torch.nn.functional.softplus(m.dt_projs_bias)  # inverse softplus of dt in [1e-3, 1e-1]
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    assert SS2D(c, scan="2d").state_dict().keys() == SS2D(c).state_dict().keys()


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="scan"):
        SS2D(8, scan="diagonal")
    with pytest.raises(ValueError, match=r"\(B, 8, H, W\)"):
        SS2D(8)(torch.randn(1, 7, 4, 4))


def test_compile_aot_eager_fullgraph():
    torch.manual_seed(5)
    for scan in ("cross1d", "2d"):
        m = _randomised(SS2D(8, scan=scan), seed=6)
        x = torch.randn(2, 8, 4, 5)
        compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), m(x))


@pytest.mark.parametrize("scan", ["cross1d", "2d"])
def test_channels_last_input_same_result(scan):
    torch.manual_seed(7)
    m = _randomised(SS2D(8, scan=scan), seed=8).to(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 5, 7)
    out = m(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out.double(), ss2d_reference(m, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scan", ["cross1d", "2d"])
def test_device_and_dtype_factory_arguments(scan):
    # every parameter is created where asked (timm builds models with device=/dtype=, e.g. on "meta")
    m = SS2D(12, d_state=2, ssm_ratio=1.5, scan=scan, device="meta", dtype=torch.float64)
    assert {(p.device.type, p.dtype) for p in m.parameters()} == {("meta", torch.float64)}
    out = m(torch.empty(2, 12, 5, 7, device="meta", dtype=torch.float64))
    assert out.shape == (2, 12, 5, 7) and out.device.type == "meta"
    # in float64 on the CPU: the released initialisation, and the forward equals the reference
    torch.manual_seed(9)
    m = SS2D(12, d_state=2, scan=scan, dtype=torch.float64)
    assert {p.dtype for p in m.parameters()} == {torch.float64}
    torch.testing.assert_close(m.A_logs, torch.log(torch.arange(1.0, 3.0, dtype=torch.float64)).repeat(4 * 12, 1))
    dt = torch.nn.functional.softplus(m.dt_projs_bias)
    assert dt.min() >= 1e-3 * (1 - 1e-9) and dt.max() <= 0.1 * (1 + 1e-9)
    m = _randomised(m, seed=10)
    x = torch.randn(1, 12, 4, 6, dtype=torch.float64)
    torch.testing.assert_close(m(x), ss2d_reference(m, x), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("scan", ["cross1d", "2d"])
def test_gradients_match_finite_differences(scan):
    # The route plumbing (unbind / split of the projections, the stacked layouts) against central
    # differences of the whole layer, for the input and every parameter.
    torch.manual_seed(5)
    m = _randomised(SS2D(4, d_state=2, ssm_ratio=1.0, scan=scan), seed=6).double()
    x = torch.randn(1, 4, 3, 4, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in m.parameters()]

    def f(xx, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (xx,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("scan", ["cross1d", "2d"])
def test_channels_last_model_scans_into_channels_last_and_same_gradients(scan):
    """A channels-last model gets the scans' sum in channels-last (out_norm then needs no copy) and
    the same gradients as a channels-first one."""
    torch.manual_seed(11)
    m = _randomised(SS2D(8, d_state=2, scan=scan), seed=12).double()
    x = torch.randn(2, 8, 5, 7, dtype=torch.float64)
    seen = []
    m.out_norm.register_forward_pre_hook(lambda mod, args: seen.append(args[0].is_contiguous(
        memory_format=torch.channels_last) and not args[0].is_contiguous()))
    gout = torch.randn_like(x)
    grads = []
    for xi in (x.clone(), x.contiguous(memory_format=torch.channels_last)):
        xi.requires_grad_(True)
        m.zero_grad()
        torch.autograd.backward(m(xi), gout)
        grads.append([xi.grad] + [p.grad.clone() for p in m.parameters()])
    assert seen == [False, True]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_row_column_sum_against_finite_differences(fmt):
    from ssm2d_nn.layers.ss2d import _RowColumnSum

    h, w = 3, 5
    y = torch.randn(2, 2 * 4, 1, h * w, dtype=torch.float64, requires_grad=True)
    out = _RowColumnSum.apply(y, h, w, fmt)
    yy = y.detach().view(2, 2, 4, h * w)
    torch.testing.assert_close(out, yy[:, 0].reshape(2, 4, h, w) + yy[:, 1].reshape(2, 4, w, h).transpose(2, 3))
    assert out.is_contiguous(memory_format=fmt)
    assert torch.autograd.gradcheck(lambda t: _RowColumnSum.apply(t, h, w, fmt), (y,))


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_cross_layouts_against_finite_differences_and_its_adjoint(fmt):
    """u -> (row-major u, column-major u) stacked, with its gradient in u's layout; it and the
    row/column sum are adjoint: <split(u), y> == <u, merge(y)>."""
    from ssm2d_nn.layers.ss2d import _CrossLayouts, _RowColumnSum

    b, d, h, w = 2, 3, 4, 5
    u = torch.randn(b, d, h, w, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_(True)
    xs = _CrossLayouts.apply(u)
    ud = u.detach()
    torch.testing.assert_close(xs, torch.stack([ud.reshape(b, d, -1), ud.transpose(2, 3).reshape(b, d, -1)], 1))
    (gu,) = torch.autograd.grad(xs, u, torch.randn_like(xs))
    assert gu.is_contiguous(memory_format=fmt)
    assert torch.autograd.gradcheck(_CrossLayouts.apply, (u,))
    y = torch.randn(b, 2 * d, 1, h * w, dtype=torch.float64)
    lhs = (xs.detach().reshape(-1) * y.reshape(-1)).sum()
    rhs = (ud * _RowColumnSum.apply(y, h, w, fmt)).sum()
    torch.testing.assert_close(lhs, rhs)


def test_silu_contiguous_of_a_channels_last_tensor():
    """SiLU written NCHW in one pass, its gradient in the input's (channels-last) layout."""
    from ssm2d_nn.layers.ss2d import _silu_contiguous

    x = torch.randn(2, 3, 4, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    y = _silu_contiguous(x)
    assert y.is_contiguous()
    torch.testing.assert_close(y, torch.nn.functional.silu(x.detach()))
    (g,) = torch.autograd.grad(y, x, torch.randn_like(y))
    assert g.is_contiguous(memory_format=torch.channels_last) and not g.is_contiguous()
    assert torch.autograd.gradcheck(_silu_contiguous, (x,))


@pytest.mark.parametrize("scan", ["cross1d", "2d"])
def test_reference_backend_keeps_second_order_gradients_on_channels_last_input(scan):
    """The one-pass layout functions are once differentiable; with backend="reference" (the way to
    higher-order gradients) SS2D runs plain ops, so second-order gradients stay correct."""
    torch.manual_seed(13)
    m = _randomised(SS2D(4, d_state=1, ssm_ratio=1.0, scan=scan, backend="reference"), seed=14).double()
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    assert torch.autograd.gradgradcheck(lambda t: m(t), (x.requires_grad_(True),), atol=1e-5, rtol=1e-4)
