"""Low-precision LayerNorms: nn.LayerNorm outside autocast; the autocast dtype (close to float32) inside."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ssm2d_nn.layers.norms import LayerNorm, LayerNorm2d


def _randomized(norm: nn.LayerNorm) -> nn.LayerNorm:
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    return norm


def test_layer_norm_equals_torch_outside_autocast():
    ours, ref = _randomized(LayerNorm(24, eps=1e-6)), nn.LayerNorm(24, eps=1e-6)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 5, 24, dtype=torch.float64)
    ours, ref = ours.double(), ref.double()
    assert torch.equal(ours(x), ref(x))
    x2 = torch.randn(2, 24, 6, 7, dtype=torch.float64)
    n2 = _randomized(LayerNorm2d(24)).double()
    expected = torch.nn.functional.layer_norm(x2.permute(0, 2, 3, 1), (24,), n2.weight, n2.bias, n2.eps)
    assert torch.equal(n2(x2), expected.permute(0, 3, 1, 2))


@pytest.mark.parametrize("cls,shape", [(LayerNorm, (4, 9, 32)), (LayerNorm2d, (2, 32, 5, 6))])
def test_layer_norm_stays_low_precision_under_autocast(cls, shape):
    norm = _randomized(cls(32))
    x = torch.randn(*shape) * 3 + 1
    with torch.no_grad():
        full = norm(x)  # float32, no autocast
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = norm(x)
    assert low.dtype == torch.bfloat16
    err = float((low.float() - full).norm() / full.norm())
    assert err < 1e-2, err


@pytest.mark.parametrize("cls,shape", [(LayerNorm, (4, 9, 32)), (LayerNorm2d, (2, 32, 5, 6))])
def test_layer_norm_on_the_meta_device(cls, shape):
    # "meta" has no autocast: the norm must not ask for it (it raised there, so models could not
    # be built and run on "meta").
    norm = cls(32, device="meta")
    out = norm(torch.empty(*shape, device="meta"))
    assert out.device.type == "meta" and out.shape == shape


@pytest.mark.parametrize("cls,shape", [(LayerNorm, (4, 9, 32)), (LayerNorm2d, (2, 32, 5, 6))])
def test_layer_norm_traces_with_fx_and_checks_autocast_when_run(cls, shape):
    norm = _randomized(cls(32))
    traced = torch.fx.symbolic_trace(norm)
    # one leaf call for the norm itself, its parameters passed in, nothing evaluated while tracing
    calls = [n.target.__name__ for n in traced.graph.nodes if n.op == "call_function"]
    assert "_layer_norm_lowp" in calls
    x = torch.randn(*shape) * 3 + 1
    with torch.no_grad():
        assert torch.equal(traced(x), norm(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, ref = traced(x), norm(x)
    assert low.dtype == torch.bfloat16 and torch.equal(low, ref)


def test_ops_layer_norm_on_the_cpu_is_torchs_and_refuses_the_kernel_by_name():
    from ssm2d_nn import BackendUnavailableError
    from ssm2d_nn.ops import layer_norm, layer_norm_kernel_refusal

    x = torch.randn(5, 7, 40, dtype=torch.float64)
    w, b = torch.randn(40, dtype=torch.float64), torch.randn(40, dtype=torch.float64)
    expected = torch.nn.functional.layer_norm(x, (40,), w, b, 1e-6)
    assert torch.equal(layer_norm(x, (40,), w, b, 1e-6), expected)
    assert "CUDA only" in layer_norm_kernel_refusal(x, (40,))
    with pytest.raises(BackendUnavailableError, match="CUDA only"):
        layer_norm(x, (40,), w, b, backend="kernel")
    with pytest.raises(ValueError, match="backend"):
        layer_norm(x, (40,), w, b, backend="fast")
    # a low-precision x with float32 parameters (what the norms pass under autocast): the parameters
    # are read in x's dtype by PyTorch's kernel
    xb = x.to(torch.bfloat16)
    got = layer_norm(xb, (40,), w.float(), b.float(), 1e-6)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, torch.nn.functional.layer_norm(xb, (40,), w.bfloat16(), b.bfloat16(), 1e-6))


def test_row_layout_places_every_row_of_a_view():
    from ssm2d_nn.ops.layer_norm import row_layout

    base = torch.arange(2 * 6 * 2 * 4 * 16, dtype=torch.float32).to(torch.bfloat16).view(2, 6, 2, 4, 16)
    views = {"contiguous": base, "q half": base[:, :, 0], "k half": base[:, :, 1],
             "heads swapped": base.transpose(2, 3), "leading permute": base.permute(1, 0, 2, 3, 4),
             "broadcast rows": base[:1, :1, :1, :1].expand(3, 1, 1, 5, 16)}
    placed = 0
    for name, v in views.items():
        layout = row_layout(v)
        rows = v.reshape(-1, 16)
        if layout is None:  # three or more strided leading dims: copied, never misread
            assert name in ("leading permute", "heads swapped")
            continue
        inner, rs, gs = layout
        flat = base.reshape(-1)
        start = (v.data_ptr() - base.data_ptr()) // v.element_size()
        for r in range(rows.shape[0]):
            off = start + (r // inner) * gs + (r % inner) * rs
            assert torch.equal(flat[off:off + 16], rows[r]), (name, r)
        placed += 1
    assert placed >= 4


def test_ops_layer_norm_compiles_with_symbolic_row_lengths():
    # dynamic=True makes every dim symbolic, as torch.compile does once one traced frame has seen
    # several shapes (the models' norms share frames across stages): the backend decision must not
    # need the row length as a constant while tracing (it did: "assume_constant_result argument
    # conversion failed"). aot_eager: the same tracing as inductor, no code generation.
    from ssm2d_nn.ops import layer_norm

    fn = torch.compile(lambda x, w, b: layer_norm(x, (x.shape[-1],), w, b), dynamic=True, fullgraph=True,
                       backend="aot_eager")
    for rows, cols in ((7, 64), (300, 48)):
        x = torch.randn(rows, 3, cols, requires_grad=True)
        w, b = torch.randn(cols, requires_grad=True), torch.randn(cols, requires_grad=True)
        dy = torch.randn_like(x)
        y = fn(x, w, b)
        got = torch.autograd.grad(y, [x, w, b], dy)
        x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
        y64 = torch.nn.functional.layer_norm(x64, (cols,), w64, b64)
        ref = torch.autograd.grad(y64, [x64, w64, b64], dy.double())
        assert torch.allclose(y.double(), y64, atol=1e-5)
        for g, r in zip(got, ref):
            assert torch.allclose(g.double(), r, atol=1e-4)
