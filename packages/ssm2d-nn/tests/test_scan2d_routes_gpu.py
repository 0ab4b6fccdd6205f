"""scan2d_routes on CUDA against the float64 reference, for every kernel family its routes take:
route outputs written into slots of one buffer, ddelta / dB / dC written into slices of the
stacked gradients, the routes' carries at offsets of one buffer."""

from __future__ import annotations

import random

import pytest
import torch

from routes_cases import NAMES, cast, make_route_inputs, random_routes
from scan2d_cases import rel_err
from ssm2d_nn.ops import scan2d_routes, scan2d_routes_reference

pytestmark = pytest.mark.gpu
SS2D_ROUTES = (("tl", "hv"), ("tl", "vh"), ("br", "hv"), ("br", "vh"))

# (batch, dim, dstate, groups, height, width, routes or K): chan kernels (N = 1, small grids, many
# channels), band kernels (N = 1, a grid wider than 64), the 1D row kernels with two groups (SS2D's
# cross1d), lanes kernels (N = 16, G = 1), tiled kernels (N = 16, 4 channels a group).
FAMILIES = {
    "chan": (66, 128, 1, 1, 14, 14, SS2D_ROUTES),
    "chan_wide": (9, 944, 1, 1, 9, 40, SS2D_ROUTES),
    "band": (2, 8, 1, 1, 40, 150, SS2D_ROUTES),
    "row": (2, 16, 1, 2, 1, 300, (("tl", "hv"), ("tr", "hv"))),
    "lanes": (1, 16, 16, 1, 20, 37, 2),
    "tiled": (1, 8, 16, 2, 19, 35, 3),
}


def _inputs(rng, family, strided=True):
    b, d, n, g, h, w, routes = FAMILIES[family]
    if isinstance(routes, int):
        routes = random_routes(rng, routes)
    x = make_route_inputs(rng, batch=b, dim=d, dstate=n, groups=g, height=h, width=w, routes=routes,
                          strided_BC=strided)
    return x, routes


def _grads(fn, inputs, gout, **kw):
    out = fn(**inputs, **kw)
    wrt = [inputs[k] for k in NAMES if inputs[k] is not None]
    return out, torch.autograd.grad(out, wrt, gout.to(out.device, out.dtype))


def _reference_case(family):
    """Fresh inputs of ``family`` (float64, CPU), its routes, an incoming gradient, and the float64
    reference's output and gradients; with the seed for failure messages."""
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    x64, routes = _inputs(rng, family)
    gout = torch.randn(x64["u"].shape, dtype=torch.float64)
    out_r, g_r = _grads(scan2d_routes_reference, cast(x64, "cpu", torch.float64), gout, delta_softplus=True,
                        routes=routes)
    return seed, x64, routes, gout, out_r, g_r


def _against_reference(family, dtype, fwd_tol, grad_tol, **kw):
    """scan2d_routes on CUDA in ``dtype`` against the float64 reference: forward and every gradient."""
    seed, x64, routes, gout, out_r, g_r = _reference_case(family)
    out_k, g_k = _grads(scan2d_routes, cast(x64, "cuda", dtype), gout, delta_softplus=True, routes=routes, **kw)
    assert out_k.is_cuda and out_k.dtype == dtype and rel_err(out_k, out_r) < fwd_tol, f"forward seed={seed}"
    for name, a, b in zip(NAMES, g_k, g_r):
        assert torch.isfinite(a).all() and rel_err(a, b) < grad_tol, f"d{name} seed={seed}: {rel_err(a, b):.2e}"
    return x64, routes, out_r, seed


@pytest.mark.parametrize("family", list(FAMILIES))
def test_against_float64(family):
    x64, routes, out_r, seed = _against_reference(family, torch.float32, 1e-5, 1e-4, backend="kernel")
    with torch.no_grad():  # inference: nothing saved
        out_i = scan2d_routes(**cast(x64, "cuda", torch.float32), delta_softplus=True, routes=routes)
    assert rel_err(out_i, out_r) < 1e-5, f"inference seed={seed}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bfloat16(family):
    _against_reference(family, torch.bfloat16, 2e-2, 5e-2)


@pytest.mark.parametrize("family", ["row", "chan", "lanes"])
def test_autocast_keeps_the_inputs_dtype_and_the_gradients(family):
    # Under CUDA autocast a plain sum of the route outputs runs in float32; the op's output stays in
    # u's dtype, and a float32 consumer's gradient (a LayerNorm autocast runs in float32, as SS2D's
    # out_norm) still gives the float64 reference's gradients (it was read as bfloat16 bytes before).
    seed, x64, routes, gout, out_r, g_r = _reference_case(family)
    x = cast(x64, "cuda", torch.bfloat16)
    wrt = [x[k] for k in NAMES if x[k] is not None]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = scan2d_routes(**x, delta_softplus=True, routes=routes)
        consumer = out.float() * 1.0
    assert out.dtype == torch.bfloat16, f"seed={seed}"
    assert rel_err(out, out_r) < 2e-2, f"forward seed={seed}"
    grads = torch.autograd.grad(consumer, wrt, gout.to("cuda", torch.float32))
    for name, a, b in zip(NAMES, grads, g_r):
        assert rel_err(a, b) < 5e-2, f"d{name} seed={seed}: {rel_err(a, b):.2e}"


@pytest.mark.parametrize("family", ["chan", "band", "lanes"])
def test_deterministic_backward_is_repeatable_and_equals_the_atomics(family):
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    x64, routes = _inputs(rng, family)
    gout = torch.randn(x64["u"].shape, dtype=torch.float64)
    _, g_atomic = _grads(scan2d_routes, cast(x64, "cuda", torch.float32), gout, delta_softplus=True, routes=routes)
    torch.use_deterministic_algorithms(True)
    try:
        _, g1 = _grads(scan2d_routes, cast(x64, "cuda", torch.float32), gout, delta_softplus=True, routes=routes)
        _, g2 = _grads(scan2d_routes, cast(x64, "cuda", torch.float32), gout, delta_softplus=True, routes=routes)
    finally:
        torch.use_deterministic_algorithms(False)
    for name, a, b, c in zip(NAMES, g1, g2, g_atomic):
        assert torch.equal(a, b), f"d{name} not repeatable, seed={seed}"
        assert rel_err(a, c) < 1e-5, f"d{name} seed={seed}"
