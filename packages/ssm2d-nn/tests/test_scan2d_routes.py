"""scan2d_routes (the sum of several scan2d routes over one input, one op) on the CPU kernel:
against the float64 reference per route, and against the sum of separate scan2d calls."""

from __future__ import annotations

import importlib
import random

import pytest
import torch

from routes_cases import NAMES, cast, make_route_inputs, random_routes
from scan2d_cases import rel_err
from ssm2d_nn.ops import scan2d, scan2d_routes, scan2d_routes_reference


def _config(rng: random.Random) -> dict:
    h, w = rng.choice([(1, rng.randint(1, 40)), (rng.randint(1, 12), 1), (rng.randint(2, 12), rng.randint(2, 12))])
    dim = rng.choice([4, 8])
    return dict(batch=rng.randint(1, 2), dim=dim, dstate=rng.choice([1, 2, 16]),
                groups=rng.choice([g for g in (1, 2, 4) if dim % g == 0]), height=h, width=w,
                routes=random_routes(rng, rng.randint(1, 4)), with_D=rng.random() < 0.7,
                with_bias=rng.random() < 0.7, softplus=rng.random() < 0.7, strided_BC=rng.random() < 0.5)


def _grads(fn, inputs: dict, gout: torch.Tensor, **kw):
    out = fn(**inputs, **kw)
    wrt = [inputs[k] for k in NAMES if inputs[k] is not None]
    return out, torch.autograd.grad(out, wrt, gout.to(out.dtype))


@pytest.mark.parametrize("trial", range(6))
def test_float64_kernel_matches_reference_forward_and_backward(trial):
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    cfg = _config(rng)
    softplus = cfg["softplus"]
    x64 = make_route_inputs(rng, **cfg)
    gout = torch.randn(x64["u"].shape, dtype=torch.float64)
    out_r, g_r = _grads(scan2d_routes_reference, cast(x64, "cpu", torch.float64), gout,
                        delta_softplus=softplus, routes=cfg["routes"])
    out_k, g_k = _grads(scan2d_routes, cast(x64, "cpu", torch.float64), gout, delta_softplus=softplus,
                        routes=cfg["routes"], backend="kernel")
    assert rel_err(out_k, out_r) < 1e-10, f"forward seed={seed} {cfg}"
    names = [k for k in NAMES if x64[k] is not None]
    for name, a, b in zip(names, g_k, g_r):
        assert a.shape == b.shape, name
        assert rel_err(a, b) < 1e-9, f"d{name} seed={seed} {cfg}: {rel_err(a, b):.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_the_sum_of_scan2d_calls(dtype):
    """Same kernels, so the op is the per-route calls summed: forward and every gradient."""
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    for _ in range(3):
        cfg = _config(rng)
        x64 = make_route_inputs(rng, **cfg)
        gout = torch.randn(x64["u"].shape, dtype=torch.float64)

        def separate(u, delta, A, B, C, D, delta_bias, delta_softplus, routes):
            ys = [scan2d(u, delta[:, k], A[k], B[:, k], C[:, k], None if D is None else D[k], None,
                         None if delta_bias is None else delta_bias[k], delta_softplus, origin=o, order=r)
                  for k, (o, r) in enumerate(routes)]
            # Summed in float32 and rounded once, as scan2d_routes sums its route outputs.
            return torch.stack([y.float() for y in ys]).sum(0).to(u.dtype)

        out_s, g_s = _grads(separate, cast(x64, "cpu", dtype), gout, delta_softplus=cfg["softplus"],
                            routes=cfg["routes"])
        out_k, g_k = _grads(scan2d_routes, cast(x64, "cpu", dtype), gout, delta_softplus=cfg["softplus"],
                            routes=cfg["routes"])
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert out_k.dtype == dtype and rel_err(out_k, out_s) < tol, f"forward seed={seed} {cfg}"
        for name, a, b in zip([k for k in NAMES if x64[k] is not None], g_k, g_s):
            assert a.dtype == b.dtype and rel_err(a, b) < tol, f"d{name} seed={seed} {cfg}: {rel_err(a, b):.2e}"


def test_backward_reads_a_gradient_handed_in_another_dtype():
    """Autograd hands a node its output's gradient in the output's dtype, which need not be the
    inputs' (under CUDA autocast a plain sum of bfloat16 route outputs came out float32): the kernels
    read dout in u's dtype, so a float32 dout of bfloat16 inputs must give exactly what the same
    values in bfloat16 give (before the fix the kernel read the float32 bytes as bfloat16)."""
    routes_mod = importlib.import_module("ssm2d_nn.ops.scan2d_routes")
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    for _ in range(3):
        cfg = _config(rng)
        x = cast(make_route_inputs(rng, **cfg), "cpu", torch.bfloat16)
        args = tuple(x[k] for k in ("u", "delta", "A", "B", "C", "D", "delta_bias"))
        dout16 = torch.randn(x["u"].shape, dtype=torch.float64).to(torch.bfloat16)
        plan = routes_mod._routes_plan(*args, tuple(cfg["routes"]), "kernel")
        assert plan is not None, cfg
        got = routes_mod._backward(plan, dout16.float(), args, None, cfg["softplus"])
        want = routes_mod._backward(plan, dout16, args, None, cfg["softplus"])
        for name, a, b in zip(NAMES, got, want):
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), f"d{name} seed={seed} {cfg}"
        # scan2d's own backward op, one route
        (o, r), k = cfg["routes"][0], 0
        u, delta, A, B, C = x["u"], x["delta"][:, k], x["A"][k], x["B"][:, k], x["C"][:, k]
        D = None if x["D"] is None else x["D"][k]
        bias = None if x["delta_bias"] is None else x["delta_bias"][k]
        out, y, carries = torch.ops.ssm2d.scan2d_fwd(u, delta, A, B, C, D, None, bias, cfg["softplus"], o, r, True)
        run = lambda g: torch.ops.ssm2d.scan2d_bwd(g, u, delta, A, B, C, D, None, bias, y, carries,  # noqa: E731
                                                   cfg["softplus"], o, r, False)
        for a, b in zip(run(dout16.float()), run(dout16)):
            assert torch.equal(a, b), f"scan2d_bwd seed={seed} {cfg}"


def test_no_grad_call_equals_the_autograd_call_and_builds_no_graph():
    rng = random.Random(random.randrange(2**31))
    cfg = dict(batch=2, dim=8, dstate=2, groups=2, height=5, width=7, routes=random_routes(rng, 3))
    x = cast(make_route_inputs(rng, **cfg), "cpu", torch.float32)
    with torch.no_grad():
        out = scan2d_routes(**x, delta_softplus=True, routes=cfg["routes"])
    assert out.grad_fn is None
    torch.testing.assert_close(out, scan2d_routes(**x, delta_softplus=True, routes=cfg["routes"]).detach())


def test_parameters_in_other_dtypes_and_layouts_are_cast():
    """float16 A / D / bias, and a non-contiguous A, give what the float32 contiguous ones give."""
    rng = random.Random(random.randrange(2**31))
    cfg = dict(batch=1, dim=4, dstate=2, groups=1, height=4, width=6, routes=(("tl", "hv"), ("br", "vh")))
    x = cast(make_route_inputs(rng, **cfg), "cpu", torch.float32)
    x = {k: None if v is None else v.detach() for k, v in x.items()}
    want = scan2d_routes(**x, delta_softplus=True, routes=cfg["routes"])
    y = dict(x, A=x["A"].to(torch.float16).float().transpose(1, 2).contiguous().transpose(1, 2),
             D=x["D"].to(torch.float16), delta_bias=x["delta_bias"].to(torch.float16))
    ref = scan2d_routes_reference(**dict(y, D=y["D"].float(), delta_bias=y["delta_bias"].float()),
                                  delta_softplus=True, routes=cfg["routes"])
    got = scan2d_routes(**y, delta_softplus=True, routes=cfg["routes"])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert rel_err(got, want) < 1e-2  # float16 parameters: close to the float32 ones


@pytest.mark.parametrize("change,exc,msg", [
    (dict(routes=()), ValueError, "at least one"),
    (dict(routes=(("tl", "xy"),)), ValueError, "order"),
    (dict(routes=("tl",)), ValueError, "pairs"),
    (dict(delta=torch.randn(1, 2, 4, 3, 5)), ValueError, "delta must have shape"),
    (dict(A=-torch.rand(2, 4, 2)), ValueError, "A must have shape"),
    (dict(B=torch.randn(1, 1, 1, 3, 3, 5)), ValueError, "B must have shape"),
    (dict(D=torch.randn(4)), ValueError, "D must have shape"),
    (dict(u=torch.randn(4, 3, 5)), ValueError, "u must have shape"),
    (dict(C=torch.randn(1, 1, 3, 2, 3, 5)), ValueError, "C with G=3"),
    (dict(delta=torch.randn(1, 1, 4, 3, 5, dtype=torch.float64)), TypeError, "delta must have the dtype of u"),
    (dict(delta_bias=[0.0] * 4), TypeError, "delta_bias must be a torch.Tensor"),
])
def test_bad_arguments_are_refused_with_the_argument_named(change, exc, msg):
    x = dict(u=torch.randn(1, 4, 3, 5), delta=torch.randn(1, 1, 4, 3, 5), A=-torch.rand(1, 4, 2),
             B=torch.randn(1, 1, 1, 2, 3, 5), C=torch.randn(1, 1, 1, 2, 3, 5), D=torch.randn(1, 4),
             delta_bias=torch.randn(1, 4))
    routes = change.pop("routes", (("tl", "hv"),))
    with pytest.raises(exc, match=msg):
        scan2d_routes(**dict(x, **change), routes=routes)


def test_deterministic_backward_stacks_what_the_route_backward_writes():
    """The deterministic backward (per route, scan2d's, stacked; used on CUDA) against the one-pass
    backward, both run by the CPU kernel here."""
    m = importlib.import_module("ssm2d_nn.ops.scan2d_routes")
    rng = random.Random(random.randrange(2**31))
    cfg = dict(batch=2, dim=8, dstate=2, groups=2, height=5, width=6, routes=random_routes(rng, 3))
    x = cast(make_route_inputs(rng, **cfg, strided_BC=True), "cpu", torch.float32)
    args = tuple(None if x[k] is None else x[k].detach() for k in NAMES)
    plan = m._routes_plan(*args, cfg["routes"], "auto")
    _, carries = m._forward(plan, args, True, save=True)
    dout = torch.randn_like(args[0])
    one_pass = m._backward(plan, dout, args, carries, True)
    per_route = m._backward_deterministic(plan, dout, args, carries, True)
    for name, a, b in zip(NAMES, per_route, one_pass):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_channels_last_output_has_the_same_values_and_gradients():
    rng = random.Random(random.randrange(2**31))
    cfg = dict(batch=2, dim=8, dstate=1, groups=1, height=4, width=6, routes=random_routes(rng, 4))
    x64 = make_route_inputs(rng, **cfg)
    gout = torch.randn(x64["u"].shape, dtype=torch.float64)
    results = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        out, grads = _grads(scan2d_routes, cast(x64, "cpu", torch.float64), gout, delta_softplus=True,
                            routes=cfg["routes"], memory_format=fmt)
        assert out.is_contiguous(memory_format=fmt)
        results.append((out, grads))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="memory_format"):
        scan2d_routes(**cast(x64, "cpu", torch.float64), routes=cfg["routes"], memory_format=torch.preserve_format)
