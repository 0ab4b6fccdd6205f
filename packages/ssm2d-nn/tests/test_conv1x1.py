"""1x1 convolutions as GEMMs (Conv1x1, Mlp1x1, grouped_1x1) against F.conv2d / F.conv1d, and the
layers and op backwards that use them or share buffers: both memory formats, autocast bf16 on the
CPU, state-dict round trips with nn.Conv2d."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssm2d_nn.layers import SS2D, Conv1x1, Mlp1x1
from ssm2d_nn.layers.conv1x1 import block_diagonal, conv1x1, grouped_1x1
from ssm2d_nn.layers.ss2d import ss2d_reference
from ssm2d_nn.ops import scan2d, scan2d_reference, wavefront2d
from ssm2d_nn.ops.wavefront2d import wavefront2d_reference

FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _fmt(x: torch.Tensor, name: str) -> torch.Tensor:
    """A copy of x in the named memory format (never x itself: callers set requires_grad on it)."""
    return x.clone(memory_format=FORMATS[name])


def _same_format(y: torch.Tensor, name: str) -> bool:
    return y.is_contiguous(memory_format=FORMATS[name])


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("hw", [(5, 7), (1, 1), (1, 6)])
def test_conv1x1_forward_and_gradients_match_conv2d_float64(fmt, bias, hw):
    torch.manual_seed(0)
    x = _fmt(torch.randn(3, 6, *hw, dtype=torch.float64), fmt).requires_grad_(True)
    ref_mod = nn.Conv2d(6, 5, 1, bias=bias, dtype=torch.float64)
    mod = Conv1x1(6, 5, bias=bias, dtype=torch.float64)
    mod.load_state_dict(ref_mod.state_dict())
    gout = torch.randn(3, 5, *hw, dtype=torch.float64)
    y = mod(x)
    assert y.shape == (3, 5, *hw) and y.dtype == torch.float64 and _same_format(y, fmt)
    grads = torch.autograd.grad(y, [x, *mod.parameters()], gout)
    xr = x.detach().clone().requires_grad_(True)
    yr = F.conv2d(xr, ref_mod.weight, ref_mod.bias)
    ref_grads = torch.autograd.grad(yr, [xr, *ref_mod.parameters()], gout)
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        assert g.shape == r.shape
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


def test_conv1x1_strided_input_takes_the_nchw_route():
    torch.manual_seed(1)
    w = torch.randn(4, 3, 1, 1, dtype=torch.float64)
    x = torch.randn(2, 3, 8, 9, dtype=torch.float64)[:, :, ::2, 1::3]  # neither format: copied once
    y = conv1x1(x, w)
    assert y.is_contiguous()
    torch.testing.assert_close(y, F.conv2d(x, w), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(conv1x1(x, w.view(4, 3)), F.conv2d(x, w), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("bias", [False, True])
def test_conv1x1_autocast_bf16_cpu(fmt, bias):
    torch.manual_seed(2)
    mod = Conv1x1(16, 24, bias=bias)
    ref_mod = nn.Conv2d(16, 24, 1, bias=bias)
    ref_mod.load_state_dict(mod.state_dict())
    x = _fmt(torch.randn(2, 16, 6, 5), fmt).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mod(x)
        yc = ref_mod(x)
    assert y.dtype == yc.dtype == torch.bfloat16 and _same_format(y, fmt)
    # Against the float64 product of the bf16-rounded operands (what both compute, fp32 accumulation).
    exact = F.conv2d(x.detach().bfloat16().double(), mod.weight.detach().bfloat16().double(),
                     None if mod.bias is None else mod.bias.detach().bfloat16().double())
    torch.testing.assert_close(y.double(), exact, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(y.float(), yc.float(), rtol=1e-2, atol=1e-2)
    gout = torch.randn(y.shape)
    gx, gw = torch.autograd.grad(y.float(), [x, mod.weight], gout)
    gxc, gwc = torch.autograd.grad(yc.float(), [x, ref_mod.weight], gout)
    assert gx.dtype == torch.float32 and gw.dtype == torch.float32
    torch.testing.assert_close(gx, gxc, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gw, gwc, rtol=2e-2, atol=5e-2)


def test_conv1x1_state_dict_round_trip_with_conv2d():
    conv = nn.Conv2d(7, 9, 1, bias=True)
    mod = Conv1x1(7, 9)
    assert isinstance(mod, nn.Conv2d)
    sd = conv.state_dict()
    assert {k: v.shape for k, v in mod.state_dict().items()} == {k: v.shape for k, v in sd.items()}
    mod.load_state_dict(sd)
    back = nn.Conv2d(7, 9, 1)
    back.load_state_dict(mod.state_dict())
    for k, v in back.state_dict().items():
        assert torch.equal(v, sd[k])
    assert mod.weight.shape == (9, 7, 1, 1)


def test_conv1x1_bad_arguments_raise():
    with pytest.raises(ValueError, match="kernel_size"):
        Conv1x1(4, 4, kernel_size=3)
    with pytest.raises(ValueError, match="stride"):
        Conv1x1(4, 4, stride=2)
    with pytest.raises(ValueError, match="groups"):
        Conv1x1(4, 4, groups=2)
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
        Conv1x1(4, 5)(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
        conv1x1(torch.randn(2, 3, 4, 4), torch.randn(5, 4, 1, 1))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        conv1x1(torch.randn(2, 3, 4), torch.randn(5, 3, 1, 1))
    with pytest.raises(ValueError, match=r"\(C_out, C_in, 1, 1\)"):
        conv1x1(torch.randn(2, 3, 4, 4), torch.randn(5, 3, 3, 3))
    with pytest.raises(ValueError, match="bias"):
        conv1x1(torch.randn(2, 3, 4, 4), torch.randn(5, 3), torch.randn(4))
    with pytest.raises(ValueError, match="grouped_1x1"):
        grouped_1x1(torch.randn(2, 7, 5), torch.randn(2, 3, 4))


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_grouped_1x1_matches_grouped_conv1d_float64(groups):
    torch.manual_seed(3)
    m, k, L = 5, 3, 11
    w = torch.randn(groups, m, k, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, groups, k + 2, L, dtype=torch.float64)[:, :, :k].requires_grad_(False)  # a strided piece
    x = x.detach().requires_grad_(True)
    y = grouped_1x1(x, w)
    xr, wr = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    yr = F.conv1d(xr.reshape(2, groups * k, L), wr.reshape(groups * m, k, 1), groups=groups)
    assert y.shape == (2, groups * m, L) and y.is_contiguous()
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    gout = torch.randn(y.shape, dtype=torch.float64)
    for g, r in zip(torch.autograd.grad(y, [x, w], gout), torch.autograd.grad(yr, [xr, wr], gout)):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


def test_block_diagonal_is_torch_block_diag():
    w = torch.randn(3, 4, 2)
    assert torch.equal(block_diagonal(w), torch.block_diag(*w.unbind(0)))
    with torch.inference_mode():  # a cached identity built here must still serve autograd later
        block_diagonal(torch.randn(5, 2, 2))
    w5 = torch.randn(5, 2, 2, requires_grad=True)
    block_diagonal(w5).sum().backward()
    assert torch.equal(w5.grad, torch.ones(5, 2, 2))
    # leading dimensions: one block-diagonal matrix each
    w4 = torch.randn(2, 3, 2, 4, 5)
    got = block_diagonal(w4)
    assert got.shape == (2, 3, 8, 10)
    for i in range(2):
        for j in range(3):
            assert torch.equal(got[i, j], torch.block_diag(*w4[i, j].unbind(0)))


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_mlp1x1_equals_timm_conv_mlp(fmt):
    from ssm2d_nn._compat import import_timm

    try:
        timm = import_timm()
    except ImportError:
        pytest.skip("needs timm")
    torch.manual_seed(4)
    ref = timm.layers.Mlp(8, 32, act_layer=nn.GELU, use_conv=True)
    torch.manual_seed(4)
    mlp = Mlp1x1(8, 32, act_layer=nn.GELU)
    # same keys, shapes and (same seed, same creation order) values
    assert list(mlp.state_dict()) == list(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(mlp.state_dict()[k], v), k
    x = _fmt(torch.randn(2, 8, 5, 6), fmt)
    y = mlp(x)
    assert _same_format(y, fmt)
    torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb, rb = mlp(x), ref(x)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), rb.float(), rtol=2e-2, atol=2e-2)
    mlp.train()
    assert isinstance(mlp.drop1, nn.Identity) and isinstance(Mlp1x1(4, drop=0.1).drop1, nn.Dropout)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_conv1x1_is_one_leaf_of_fx_traces(fmt):
    # timm's FX feature extraction traces the MLP: the shape checks must not become control flow
    mlp = Mlp1x1(4, 8)
    gm = torch.fx.symbolic_trace(mlp)
    assert sum(1 for nd in gm.graph.nodes if nd.op == "call_function" and nd.target is conv1x1) == 2
    x = _fmt(torch.randn(2, 4, 3, 5), fmt)
    torch.testing.assert_close(gm(x), mlp(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
        gm(torch.randn(2, 5, 3, 3))


@pytest.mark.parametrize("scan", ["cross1d", "2d"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_ss2d_gradients_both_formats_match_reference_backend(scan, fmt):
    # The GEMM projections and the route pieces (unbind of A / D / dt bias, block-diagonal dt_proj)
    # against the reference scan backend, the input in either memory format.
    torch.manual_seed(6)
    m = SS2D(8, d_state=2, ssm_ratio=1.5, scan=scan).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x = torch.randn(2, 8, 5, 4, dtype=torch.float64)
    grads = {}
    for backend in ("kernel", "reference"):
        m.backend = backend
        m.zero_grad()
        xi = _fmt(x, fmt).requires_grad_(True)
        out = m(xi)
        torch.testing.assert_close(out, ss2d_reference(m, x), rtol=1e-9, atol=1e-10)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads[backend] = {"x": xi.grad.clone(), **{n: p.grad.clone() for n, p in m.named_parameters()}}
    for name, g in grads["kernel"].items():
        torch.testing.assert_close(g, grads["reference"][name], rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("scan", ["cross1d", "2d"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_ss2d_autocast_bf16_cpu_close_to_float64(scan, fmt):
    torch.manual_seed(7)
    m = SS2D(16, d_state=1, scan=scan).to(memory_format=FORMATS[fmt])
    x = _fmt(torch.randn(2, 16, 6, 5), fmt)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    assert out.dtype == torch.bfloat16
    ref = ss2d_reference(m, x)
    err = (out.double() - ref).abs().max() / ref.abs().max()
    assert err < 3e-2, float(err)


@pytest.mark.parametrize("dstate", [1, 3])
@pytest.mark.parametrize("with_d,with_bias", [(True, True), (False, False), (True, False)])
def test_scan2d_backward_shared_buffers(dstate, with_d, with_bias):
    # dA / dD / ddelta_bias and dB / dC come out of one buffer each: each gradient against the
    # reference backend, for N = 1 (one sum) and N > 1, with and without D and delta_bias.
    torch.manual_seed(8)
    b, d, g, h, w = 2, 6, 3, 4, 5
    t = lambda *s: torch.randn(*s, dtype=torch.float64)  # noqa: E731
    args = dict(u=t(b, d, h, w), delta=0.5 * t(b, d, h, w), A=-(torch.rand(d, dstate, dtype=torch.float64) + 0.2),
                B=t(b, g, dstate, h, w), C=t(b, g, dstate, h, w), D=t(d) if with_d else None, z=None,
                delta_bias=0.3 * t(d) if with_bias else None)
    leaves = {k: v.requires_grad_(True) for k, v in args.items() if v is not None}
    gout = t(b, d, h, w)
    got = torch.autograd.grad(scan2d(**args, delta_softplus=True, backend="kernel"), list(leaves.values()), gout)
    ref = torch.autograd.grad(scan2d_reference(**args, delta_softplus=True), list(leaves.values()), gout)
    for name, a, r in zip(leaves, got, ref):
        assert a.shape == leaves[name].shape
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-10, msg=name)
    # The custom op (traced path) must return outputs that share no storage.
    outs = torch.ops.ssm2d.scan2d_bwd(gout, *(args[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")),
                                      torch.empty(0, dtype=torch.float64), torch.empty(0), True, "tl", "hv", False)
    ptrs = [o.untyped_storage().data_ptr() for o in outs if o.numel()]
    assert len(ptrs) == len(set(ptrs))


@pytest.mark.parametrize("dstate", [1, 4])
@pytest.mark.parametrize("with_d", [True, False])
def test_wavefront2d_backward_shared_buffers(dstate, with_d):
    torch.manual_seed(9)
    b, h, w, e = 2, 4, 5, 6
    t = lambda *s: torch.randn(*s, dtype=torch.float64)  # noqa: E731
    pos = lambda *s: torch.rand(*s, dtype=torch.float64) * 0.5 + 0.05  # noqa: E731
    args = dict(u=t(b, h, w, e), dT=pos(b, h, w, e), dL=pos(b, h, w, e), AT=-pos(e, dstate), AL=-pos(e, dstate),
                BT=t(b, h, w, dstate), BL=t(b, h, w, dstate), C=t(b, h, w, dstate), D=t(e) if with_d else None)
    leaves = {k: v.requires_grad_(True) for k, v in args.items() if v is not None}
    gout = t(b, h, w, e)
    got = torch.autograd.grad(wavefront2d(**args, backend="kernel"), list(leaves.values()), gout)
    ref = torch.autograd.grad(wavefront2d_reference(**args), list(leaves.values()), gout)
    for name, a, r in zip(leaves, got, ref):
        assert a.shape == leaves[name].shape
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-10, msg=name)
    outs = torch.ops.ssm2d.wavefront2d_bwd(gout, *args.values(), "tl", False)
    ptrs = [o.untyped_storage().data_ptr() for o in outs if o.numel()]
    assert len(ptrs) == len(set(ptrs))
