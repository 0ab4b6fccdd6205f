"""scan2d on the CPU: kernel against the float64 reference, the reference against closed forms."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from scan2d_cases import ORDERS, ORIGINS, make_inputs, random_config, rel_err
from ssm2d_nn.ops import scan2d, scan2d_reference

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def _grads(out, inputs, gout):
    leaves = [inputs[k] for k in NAMES if inputs[k] is not None]
    return torch.autograd.grad(out, leaves, gout)


@pytest.mark.parametrize("origin,order", list(itertools.product(ORIGINS, ORDERS)))
def test_cpu_kernel_matches_reference_forward_and_all_gradients(origin, order):
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    for _ in range(6):
        cfg = random_config(rng)
        softplus = cfg.pop("softplus")
        inputs = make_inputs(rng, **cfg, softplus=softplus)
        for v in inputs.values():
            if v is not None:
                v.requires_grad_(True)
        out_k = scan2d(**inputs, delta_softplus=softplus, origin=origin, order=order, backend="kernel")
        out_r = scan2d_reference(**inputs, delta_softplus=softplus, origin=origin, order=order)
        ctx = f"seed={seed} cfg={cfg} softplus={softplus}"
        assert rel_err(out_k, out_r) < 1e-12, ctx
        gout = torch.randn_like(out_r)
        for name, gk, gr in zip([k for k in NAMES if inputs[k] is not None], _grads(out_k, inputs, gout),
                                _grads(out_r, inputs, gout)):
            assert rel_err(gk, gr) < 1e-10, f"d{name}: {ctx}"


def _l_path_closed_form(u, delta, A, B, C):
    """h[i,j] = sum over sources (i', j') <= (i, j) of the decays along the one L-shaped path."""
    b, d, H, W = u.shape
    n = A.shape[1]
    a = torch.exp(delta[:, :, None] * A[None, :, :, None, None])
    x = (delta * u)[:, :, None] * B
    y = torch.zeros_like(u)
    for i, j in itertools.product(range(H), range(W)):
        h = torch.zeros(b, d, n, dtype=u.dtype)
        for i2, j2 in itertools.product(range(i + 1), range(j + 1)):
            down = torch.prod(a[..., i2 + 1:i + 1, j], dim=-1)  # down the destination column
            right = torch.prod(a[..., i2, j2 + 1:j + 1], dim=-1)  # along the source row
            h = h + down * right * x[..., i2, j2]
        y[..., i, j] = (C[..., i, j] * h).sum(-1)
    return y


def test_reference_equals_the_l_shaped_path_sum():
    rng = random.Random()
    inputs = make_inputs(rng, batch=2, dim=3, dstate=2, groups=3, height=3, width=4, with_D=False, with_z=False,
                         with_bias=False, softplus=False)
    expect = _l_path_closed_form(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"])
    got_ref = scan2d_reference(**inputs)
    got_kernel = scan2d(**inputs, backend="kernel")
    assert rel_err(got_ref, expect) < 1e-12
    assert rel_err(got_kernel, expect) < 1e-12
    # ... and it is not the all-paths sum a*(h[i-1,j] + h[i,j-1]) + x.
    a = torch.exp(inputs["delta"][:, :, None] * inputs["A"][None, :, :, None, None])
    x = (inputs["delta"] * inputs["u"])[:, :, None] * inputs["B"]
    h = torch.zeros_like(x)
    for i, j in itertools.product(range(3), range(4)):
        prev = (h[..., i - 1, j] if i else 0) + (h[..., i, j - 1] if j else 0)
        h[..., i, j] = a[..., i, j] * prev + x[..., i, j]
    assert rel_err((inputs["C"] * h).sum(2), expect) > 1e-3


def test_single_row_is_the_1d_selective_scan():
    rng = random.Random()
    inputs = make_inputs(rng, batch=2, dim=6, dstate=4, groups=2, height=1, width=57, softplus=True)
    u, delta, A, B, C, D, z, bias = (inputs[k] for k in NAMES)
    # Mamba's selective scan over a sequence, written out independently.
    dt = torch.nn.functional.softplus(delta[:, :, 0] + bias[:, None])  # (b, d, L)
    Bd = B[:, :, :, 0].repeat_interleave(3, dim=1)  # (b, d, n, L)
    Cd = C[:, :, :, 0].repeat_interleave(3, dim=1)
    h = torch.zeros(2, 6, 4, dtype=u.dtype)
    ys = []
    for t in range(57):
        h = torch.exp(dt[..., t, None] * A) * h + (dt[..., t] * u[:, :, 0, t])[..., None] * Bd[..., t]
        ys.append((h * Cd[..., t]).sum(-1) + D * u[:, :, 0, t])
    y = torch.stack(ys, -1) * torch.nn.functional.silu(z[:, :, 0])
    assert rel_err(scan2d(**inputs, delta_softplus=True, backend="kernel")[:, :, 0], y) < 1e-12
    assert rel_err(scan2d_reference(**inputs, delta_softplus=True)[:, :, 0], y) < 1e-12


def test_columns_first_is_rows_first_on_the_transpose_and_differs():
    rng = random.Random()
    inputs = make_inputs(rng, batch=1, dim=4, dstate=4, groups=1, height=9, width=13)
    t = {k: (v.transpose(-1, -2) if v is not None and v.dim() >= 4 else v) for k, v in inputs.items()}
    vh = scan2d(**inputs, delta_softplus=True, order="vh", backend="kernel")
    hv_t = scan2d(**t, delta_softplus=True, order="hv", backend="kernel").transpose(-1, -2)
    assert rel_err(vh, hv_t) < 1e-13
    assert rel_err(vh, scan2d(**inputs, delta_softplus=True, backend="kernel")) > 1e-3


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
def test_cpu_kernel_low_precision_against_float64(dtype, tol):
    rng = random.Random()
    inputs = make_inputs(rng, batch=1, dim=8, dstate=16, groups=2, height=33, width=40)
    low = {k: None if v is None else v.to(torch.float32 if k in ("A", "D", "delta_bias") else dtype)
           for k, v in inputs.items()}
    out = scan2d(**low, delta_softplus=True, backend="kernel")
    assert out.dtype == dtype
    assert rel_err(out, scan2d_reference(**inputs, delta_softplus=True)) < tol


def test_backward_is_bitwise_deterministic():
    rng = random.Random()
    inputs = make_inputs(rng, batch=2, dim=8, dstate=4, groups=2, height=20, width=17, dtype=torch.float32)
    for v in inputs.values():
        if v is not None:
            v.requires_grad_(True)
    gout = torch.randn(2, 8, 20, 17)
    runs = [_grads(scan2d(**inputs, delta_softplus=True, backend="kernel"), inputs, gout) for _ in range(3)]
    for later in runs[1:]:
        for a, b in zip(runs[0], later):
            assert torch.equal(a, b)


def test_non_contiguous_and_broadcast_strides():
    rng = random.Random()
    inputs = make_inputs(rng, batch=2, dim=4, dstate=4, groups=2, height=11, width=9)
    # u as a channels-last view, B expanded over the batch (stride 0), z a slice of a larger tensor.
    strided = dict(inputs)
    strided["u"] = inputs["u"].permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    strided["B"] = inputs["B"][:1].expand(2, -1, -1, -1, -1)
    strided["z"] = torch.cat([inputs["z"], inputs["z"]], dim=-1)[..., :9]
    ref_inputs = dict(strided, B=strided["B"].contiguous(), z=strided["z"].contiguous(), u=inputs["u"])
    out = scan2d(**strided, delta_softplus=True, origin="br", order="vh", backend="kernel")
    ref = scan2d_reference(**ref_inputs, delta_softplus=True, origin="br", order="vh")
    assert rel_err(out, ref) < 1e-12


def test_torch_compile_fullgraph_traces_forward_and_backward():
    rng = random.Random()
    inputs = make_inputs(rng, batch=1, dim=4, dstate=4, groups=2, height=10, width=12, dtype=torch.float32)
    for v in inputs.values():
        if v is not None:
            v.requires_grad_(True)

    def f(u, delta, A, B, C, D, z, delta_bias):
        return scan2d(u, delta, A, B, C, D, z, delta_bias, True, origin="tr", order="vh", backend="kernel").sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(**inputs)
    g_got = torch.autograd.grad(got, [v for v in inputs.values()])
    want = f(**inputs)
    g_want = torch.autograd.grad(want, [v for v in inputs.values()])
    assert rel_err(got, want) < 1e-6
    for a, b in zip(g_got, g_want):
        assert rel_err(a, b) < 1e-6


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        u = torch.empty(2, 8, 5, 7)
        out, y, carries = torch.ops.ssm2d.scan2d_fwd(u, u, torch.empty(8, 3), torch.empty(2, 4, 3, 5, 7),
                                                     torch.empty(2, 4, 3, 5, 7), None, u, None, True, "tl", "hv",
                                                     False)
        # On the CPU nothing is kept for the backward: no carries, and no pre-gate output (only the
        # CUDA tiled kernels, N >= 8, need it; here N = 3).
        assert out.shape == (2, 8, 5, 7) and y.numel() == 0 and carries.numel() == 0


BAD = [
    (dict(u=torch.randn(2, 8, 5)), ValueError, r"u must have shape \(batch, D, H, W\)"),
    (dict(A=torch.randn(7, 4)), ValueError, r"A must have shape \(D, N\) with D=8"),
    (dict(B=torch.randn(2, 3, 4, 5, 6), C=torch.randn(2, 3, 4, 5, 6)), ValueError, r"G=3 groups, which must divide D=8"),
    (dict(C=torch.randn(2, 2, 4, 5, 7)), ValueError, r"C must have shape \(batch, G, N, H, W\) = \(2, 2, 4, 5, 6\)"),
    (dict(delta=torch.randn(2, 8, 6, 5)), ValueError, r"delta must have shape \(batch, D, H, W\) like u"),
    (dict(D=torch.randn(9)), ValueError, r"D must have shape \(D,\) = \(8,\)"),
    (dict(z=torch.randn(1, 8, 5, 6)), ValueError, r"z must have shape"),
    (dict(u=torch.randint(0, 3, (2, 8, 5, 6))), TypeError, r"u must be float32, float16, bfloat16 or float64"),
    (dict(delta=torch.randn(2, 8, 5, 6, dtype=torch.float64)), TypeError, r"delta must have the dtype of u"),
    (dict(delta_bias=torch.randn(8, device="meta")), ValueError, r"delta_bias is on meta but u is on cpu"),
    (dict(u=torch.randn(2, 8, 0, 6)), ValueError, r"H >= 1 and W >= 1"),
    (dict(origin="center"), ValueError, r"origin must be one of"),
    (dict(order="hvh"), ValueError, r"order must be one of"),
    (dict(backend="fast"), ValueError, r"backend must be one of"),
    (dict(u=[1.0]), TypeError, r"u must be a torch.Tensor"),
]


@pytest.mark.parametrize("override,exc,msg", BAD)
def test_bad_inputs_raise_naming_the_argument(override, exc, msg):
    args = dict(u=torch.randn(2, 8, 5, 6), delta=torch.randn(2, 8, 5, 6), A=-torch.rand(8, 4),
                B=torch.randn(2, 2, 4, 5, 6), C=torch.randn(2, 2, 4, 5, 6), D=None, z=None, delta_bias=None)
    args.update(override)
    with pytest.raises(exc, match=msg):
        scan2d(**args)


def test_kernel_boundary_checks_without_torch_semantics():
    """ssm2d_kernels validates too: its callers need not be ssm2d_nn."""
    from ssm2d_kernels.scan2d import scan2d_forward

    u = torch.randn(1, 4, 3, 3)
    with pytest.raises(ValueError, match=r"B must have shape \(batch, G, N, H, W\)"):
        scan2d_forward(u, u, -torch.rand(4, 2), torch.randn(1, 1, 2, 3), torch.randn(1, 1, 2, 3, 3), out=u.clone())
    with pytest.raises(TypeError, match=r"A must be float32 for float32 inputs"):
        scan2d_forward(u, u, -torch.rand(4, 2, dtype=torch.float64), torch.randn(1, 1, 2, 3, 3),
                       torch.randn(1, 1, 2, 3, 3), out=u.clone())
    with pytest.raises(TypeError, match=r"u must be an array"):
        scan2d_forward("u", u, -torch.rand(4, 2), torch.randn(1, 1, 2, 3, 3), torch.randn(1, 1, 2, 3, 3), out=u)
