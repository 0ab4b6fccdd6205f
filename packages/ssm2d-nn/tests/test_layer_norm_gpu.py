"""The CUDA LayerNorm kernel against float64 PyTorch: forward, dx, dweight, dbias, every row shape."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssm2d_nn import BackendUnavailableError
from ssm2d_nn.layers.norms import LayerNorm, LayerNorm2d
from ssm2d_nn.ops import layer_norm, layer_norm_kernel_refusal
from ssm2d_nn.ops.layer_norm import row_layout

pytestmark = pytest.mark.gpu

# fp32 rows hold up to 1024 columns, 16-bit rows up to 2048 (multiples of 4 / 8)
COLS = {torch.float32: [4, 32, 64, 96, 128, 320, 512, 768, 1024],
        torch.float16: [8, 32, 64, 96, 160, 320, 512, 1024, 2048],
        torch.bfloat16: [8, 32, 64, 96, 128, 320, 576, 1024, 2048]}
TOL = {torch.float32: (2e-6, 1e-5), torch.float16: (2e-3, 4e-3), torch.bfloat16: (1e-2, 2e-2)}


def _rel(a, b):
    return float((a.detach().double() - b.detach()).norm() / b.detach().norm().clamp_min(1e-30))


def _reference(x, w, b, eps, dy):
    x64 = x.detach().double().requires_grad_(True)
    w64 = None if w is None else w.detach().double().requires_grad_(True)
    b64 = None if b is None else b.detach().double().requires_grad_(True)
    y = F.layer_norm(x64, (x.shape[-1],), w64, b64, eps)
    grads = torch.autograd.grad(y, [t for t in (x64, w64, b64) if t is not None], dy.double())
    return y, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_equals_float64_forward_and_backward_for_every_row_shape(dtype):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    for cols in COLS[dtype]:
        for rows, affine in ((1, True), (37, False), (4099, True)):
            x = (torch.randn(rows, cols, generator=g) * 3 + torch.randn(rows, 1, generator=g) * 5).to("cuda", dtype)
            w = (torch.randn(cols, generator=g) + 1).cuda().requires_grad_(True) if affine else None
            b = torch.randn(cols, generator=g).cuda().requires_grad_(True) if affine else None
            x.requires_grad_(True)
            dy = torch.randn(rows, cols, generator=g).to("cuda", dtype)
            y = layer_norm(x, (cols,), w, b, 1e-5, backend="kernel")
            got = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], dy)
            y_r, ref = _reference(x, w, b, 1e-5, dy)
            ctx = f"{dtype} rows={rows} cols={cols} affine={affine}"
            assert y.dtype == dtype and y.shape == x.shape, ctx
            ftol, gtol = TOL[dtype]
            assert _rel(y, y_r) < ftol, f"y {ctx}: {_rel(y, y_r):.2e}"
            for name, a, r in zip(("dx", "dweight", "dbias"), got, ref):
                assert a.dtype == (dtype if name == "dx" else torch.float32), ctx
                assert _rel(a, r) < gtol, f"{name} {ctx}: {_rel(a, r):.2e}"


def test_kernel_is_deterministic_and_takes_any_leading_shape_strides_and_offsets():
    x = torch.randn(3, 17, 23, 64, device="cuda", dtype=torch.bfloat16) * 2
    w = torch.randn(64, device="cuda", requires_grad=True)
    b = torch.randn(64, device="cuda", requires_grad=True)
    dy = torch.randn_like(x)
    runs = []
    for _ in range(2):
        xr = x.clone().requires_grad_(True)
        y = layer_norm(xr, (64,), w, b, backend="kernel")
        runs.append((y,) + torch.autograd.grad(y, [xr, w, b], dy))
    for a, c in zip(*runs):
        assert torch.equal(a, c)  # bitwise: fixed summation order
    # a permuted (channels-first storage) input, and a view at an odd element offset
    base = torch.randn(2, 64, 9, 11, device="cuda", dtype=torch.float32)
    xp = base.permute(0, 2, 3, 1)
    assert not xp.is_contiguous()
    assert _rel(layer_norm(xp, (64,), w, b, backend="kernel"), F.layer_norm(xp.double(), (64,), w.double(), b.double())) < 2e-6
    # the q half of a (batch, L, 2, heads, head_dim) tensor: read in place (two-level row layout)
    qk = (torch.randn(3, 50, 2, 10, 32, device="cuda") * 2).to(torch.bfloat16).requires_grad_(True)
    q = qk[:, :, 0]
    assert row_layout(q) == (10, 32, 2 * 10 * 32)
    w32 = torch.randn(32, device="cuda", requires_grad=True)
    yq = layer_norm(q, (32,), w32, None, backend="kernel")
    dyq = torch.randn_like(yq)
    gqk, gw = torch.autograd.grad(yq, [qk, w32], dyq)
    qk64, w64 = qk.detach().double().requires_grad_(True), w32.detach().double().requires_grad_(True)
    y64 = F.layer_norm(qk64[:, :, 0], (32,), w64)
    rqk, rw = torch.autograd.grad(y64, [qk64, w64], dyq.double())
    assert _rel(yq, y64) < 1e-2 and _rel(gqk, rqk) < 2e-2 and _rel(gw, rw) < 2e-2
    assert gqk[:, :, 1].abs().max() == 0  # the k half gets no gradient
    flat = torch.randn(1 + 40 * 32, device="cuda")
    xo = flat[1:].view(40, 32)  # data pointer 4 bytes past a 16-byte boundary
    assert _rel(layer_norm(xo, (32,), backend="kernel"), F.layer_norm(xo.double(), (32,))) < 2e-6


def test_refusals_name_the_reason_and_auto_falls_back_to_torch():
    x = torch.randn(10, 33, device="cuda", dtype=torch.bfloat16)  # 33 is not a multiple of 8
    assert "multiple of 8" in layer_norm_kernel_refusal(x, (33,))
    with pytest.raises(BackendUnavailableError, match="multiple of 8"):
        layer_norm(x, (33,), backend="kernel")
    got = layer_norm(x, (33,))
    assert torch.equal(got, F.layer_norm(x, (33,)))
    wide = torch.randn(4, 4096, device="cuda", dtype=torch.float32)
    assert "at most 1024" in layer_norm_kernel_refusal(wide, (4096,))
    assert layer_norm_kernel_refusal(torch.randn(2, 3, 8, device="cuda"), (3, 8)) is not None


@pytest.mark.parametrize("cls,shape", [(LayerNorm, (4, 9, 11, 96)), (LayerNorm2d, (2, 96, 13, 7))])
def test_norm_layers_under_autocast_run_the_kernel_close_to_float64(cls, shape):
    norm = cls(96).cuda()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = (torch.randn(*shape, device="cuda") * 3 + 1).requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = norm(x)
    assert y.dtype == torch.bfloat16
    dy = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(y, [x, norm.weight, norm.bias], dy)
    x64 = x.detach().double().requires_grad_(True)
    w64, b64 = norm.weight.detach().double().requires_grad_(True), norm.bias.detach().double().requires_grad_(True)
    perm = (0, 2, 3, 1) if cls is LayerNorm2d else (0, 1, 2, 3)
    inv = (0, 3, 1, 2) if cls is LayerNorm2d else (0, 1, 2, 3)
    # the layer reads x rounded to bfloat16 (autocast's dtype): so does the reference
    xr = x64.bfloat16().double()
    y64 = F.layer_norm(xr.permute(*perm), (96,), w64, b64, norm.eps).permute(*inv)
    rx, rw, rb = torch.autograd.grad(y64, [x64, w64, b64], dy.double())
    assert _rel(y, y64) < 1e-2
    for a, r in ((gx, rx), (gw, rw), (gb, rb)):
        assert _rel(a, r) < 3e-2


def test_compiled_layer_norm_equals_eager():
    x = torch.randn(6, 50, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(128, device="cuda", requires_grad=True)
    b = torch.randn(128, device="cuda", requires_grad=True)
    fn = torch.compile(lambda x, w, b: layer_norm(x, (128,), w, b, backend="kernel"), fullgraph=True)
    dy = torch.randn_like(x)
    y_c = fn(x, w, b)
    g_c = torch.autograd.grad(y_c, [x, w, b], dy)
    y_e = layer_norm(x, (128,), w, b, backend="kernel")
    g_e = torch.autograd.grad(y_e, [x, w, b], dy)
    assert torch.equal(y_c, y_e)
    for a, c in zip(g_c, g_e):
        assert torch.equal(a, c)


@pytest.mark.parametrize("backend", ["auto", "kernel"])
def test_compiled_with_dynamic_shapes_equals_float64(backend):
    # dynamic=True makes every dim symbolic (as torch.compile does after a recompile on a new batch
    # size): the kernel's checks must not need the row length as a constant while tracing.
    fn = torch.compile(lambda x, w, b: layer_norm(x, (64,), w, b, backend=backend), dynamic=True, fullgraph=True)
    w = torch.randn(64, device="cuda", requires_grad=True)
    b = torch.randn(64, device="cuda", requires_grad=True)
    for rows in (7, 300):
        x = torch.randn(rows, 3, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn_like(x)
        y = fn(x, w, b)
        g = torch.autograd.grad(y, [x, w, b], dy)
        x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
        y64 = F.layer_norm(x64, (64,), w64, b64, 1e-5)
        r = torch.autograd.grad(y64, [x64, w64, b64], dy.double())
        assert _rel(y, y64) < 1e-2
        for a, ref in zip(g, r):
            assert _rel(a, ref) < 3e-2


def test_compiled_kernel_backend_refuses_rows_it_cannot_take():
    fn = torch.compile(lambda x: layer_norm(x, (12,), backend="kernel"), dynamic=True)
    x = torch.randn(5, 12, device="cuda", dtype=torch.bfloat16)  # 12 is not a multiple of 8 bf16
    with pytest.raises(Exception, match="multiple of 8"):
        fn(x)
