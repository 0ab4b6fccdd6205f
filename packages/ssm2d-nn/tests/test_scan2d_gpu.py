"""scan2d on CUDA against the float64 reference; streams, graphs, devices, 64-bit offsets."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from scan2d_cases import ORDERS, ORIGINS, make_inputs, random_config, rel_err
from ssm2d_nn import BackendUnavailableError
from ssm2d_nn.ops import scan2d, scan2d_reference

pytestmark = pytest.mark.gpu
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def _to(inputs, device, dtype):
    params = ("A", "D", "delta_bias")
    return {k: None if v is None else v.detach().to(device=device, dtype=torch.float32 if k in params else dtype)
            .requires_grad_(True) for k, v in inputs.items()}


def _run(inputs, gout, **kw):
    out = scan2d(**inputs, **kw)
    leaves = [inputs[k] for k in NAMES if inputs[k] is not None]
    return out, torch.autograd.grad(out, leaves, gout.to(out.device, out.dtype))


def _check_against_float64(inputs64, dtype, fwd_tol, grad_tol, seed, **kw):
    gout = torch.randn(inputs64["u"].shape, dtype=torch.float64)
    ref_in = _to(inputs64, "cpu", torch.float64)
    out_r, g_r = _run(ref_in, gout, backend="reference", **kw)
    gpu_in = _to(inputs64, "cuda", dtype)
    out_k, g_k = _run(gpu_in, gout, backend="kernel", **kw)
    assert out_k.dtype == dtype and out_k.is_cuda
    assert rel_err(out_k, out_r) < fwd_tol, f"forward seed={seed} {kw}"
    names = [k for k in NAMES if inputs64[k] is not None]
    for name, a, b in zip(names, g_k, g_r):
        assert torch.isfinite(a).all(), f"d{name} not finite, seed={seed}"
        assert rel_err(a, b) < grad_tol, f"d{name} seed={seed} {kw}: {rel_err(a, b):.2e}"


@pytest.mark.parametrize("origin,order", list(itertools.product(ORIGINS, ORDERS)))
def test_float32_matches_float64_reference(origin, order):
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    for _ in range(4):
        cfg = random_config(rng)
        softplus = cfg.pop("softplus")
        inputs = make_inputs(rng, **cfg, softplus=softplus)
        _check_against_float64(inputs, torch.float32, 1e-5, 1e-4, (seed, cfg), delta_softplus=softplus,
                               origin=origin, order=order)


@pytest.mark.parametrize("dtype,fwd_tol,grad_tol", [(torch.bfloat16, 2e-2, 5e-2), (torch.float16, 4e-3, 1e-2)])
@pytest.mark.parametrize("dim,groups", [(8, 2), (16, 2)])  # tiled kernels; lanes kernels (8 channels a group)
def test_half_precisions_against_float64(dtype, fwd_tol, grad_tol, dim, groups):
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    inputs = make_inputs(rng, batch=2, dim=dim, dstate=16, groups=groups, height=45, width=38)
    _check_against_float64(inputs, dtype, fwd_tol, grad_tol, seed, delta_softplus=True, origin="br", order="vh")


@pytest.mark.parametrize("h,w,n,g", [(128, 128, 16, 1), (67, 200, 16, 4), (1, 3000, 1, 4), (300, 1, 4, 2),
                                     (20, 415, 16, 1), (9, 150, 72, 1)])
def test_larger_grids(h, w, n, g):
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    inputs = make_inputs(rng, batch=1, dim=8, dstate=n, groups=g, height=h, width=w)
    _check_against_float64(inputs, torch.float32, 1e-5, 1e-4, seed, delta_softplus=True)


# The lanes kernels (8 <= N <= 16, channels of a group a multiple of 8 or G == 1): blocks of 16 or 8
# channels, 16-column strips handing G on per row forward and a*lamH backward, h saved every 16th
# row. Widths around the strip edges, heights around the 16-row segments, partial channel blocks.
@pytest.mark.parametrize("dim,groups,dstate", [(16, 2, 16), (32, 2, 8), (24, 3, 12), (20, 1, 16)])
def test_lanes_forward_strips_and_channel_blocks(dim, groups, dstate):
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    for h, w in [(33, 70), (1, 17), (65, 16), (31, 33), (40, 100)]:
        cfg = dict(batch=rng.randint(1, 2), dim=dim, dstate=dstate, groups=groups, height=h, width=w,
                   with_D=rng.random() < 0.7, with_z=rng.random() < 0.6, with_bias=rng.random() < 0.6,
                   softplus=rng.random() < 0.7)
        inputs = make_inputs(rng, **cfg)
        origin, order = rng.choice(ORIGINS), rng.choice(ORDERS)
        _check_against_float64(inputs, torch.float32, 1e-5, 1e-4, (seed, cfg), delta_softplus=cfg["softplus"],
                               origin=origin, order=order)


def test_lanes_backward_deterministic_chunks_of_one_channel(monkeypatch):
    # A tiny workspace budget makes the deterministic backward run one channel per call: channel
    # ranges that start inside a block of the lanes kernels.
    import sys

    monkeypatch.setattr(sys.modules["ssm2d_nn.ops.scan2d"], "DETERMINISTIC_WORKSPACE_BYTES", 1)
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    inputs = make_inputs(rng, batch=2, dim=24, dstate=16, groups=1, height=37, width=41)
    torch.use_deterministic_algorithms(True)
    try:
        _check_against_float64(inputs, torch.float32, 1e-5, 1e-4, seed, delta_softplus=True, origin="tr")
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("groups", [1, 32])
def test_lanes_forward_many_blocks(groups):
    # More (batch, channel block, strip) blocks than SMs: two-row steps at two blocks per SM (the
    # small cases above run four-row steps); groups=32 gives 8-channel blocks. 2 x 32 x 14 = 896
    # blocks of 8 channels: two full waves at three per SM, so the backward runs its lean instance.
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    inputs = make_inputs(rng, batch=2, dim=256, dstate=16, groups=groups, height=9, width=220)
    _check_against_float64(inputs, torch.float32, 1e-5, 1e-4, seed, delta_softplus=True,
                           origin=rng.choice(ORIGINS))


# The chan kernels (N == 1, both scanned sides of at most 64 cells, warps of channels in one group,
# enough warps): lanes of a channel hold the short side (8 cells per lane: one lane up to 8 cells, 2
# up to 16, 4 up to 32, 8 up to 64, the chains joined across them) and walk the long side. Both walks (the
# scanned rows short, or the scanned columns short, as columns-first routes read in place give),
# every origin, segments of 4 steps around their ends, every register layout and the cells past the
# short side's end in the last lane, partial last warps (dim not a multiple of 32 with one group).
# Grids with both sides of at most 16 cells run the whole-channel kernels instead of the walk (blocks
# of 8 or 16 channels in shared memory, the backward recomputing the forward; dim 940 with one group
# leaves a partial last block of either).
@pytest.mark.parametrize("h,w", [(14, 14), (7, 7), (3, 16), (16, 3), (9, 40), (40, 9), (17, 5), (2, 11), (5, 1),
                                 (16, 16), (56, 56), (28, 28), (20, 33), (33, 17), (64, 64), (45, 62), (2, 64)])
def test_chan_kernels_against_float64(h, w):
    from ssm2d_kernels import _C

    seed = random.randrange(2**31)
    rng = random.Random(seed)
    batch, dim, groups = rng.choice([(9, 960, 3), (9, 944, 1), (9, 940, 1), (66, 128, 4)])
    cfg = dict(batch=batch, dim=dim, dstate=1, groups=groups, height=h, width=w, with_D=rng.random() < 0.7,
               with_z=rng.random() < 0.6, with_bias=rng.random() < 0.6, softplus=rng.random() < 0.7)
    origin, order = rng.choice(ORIGINS), "hv" if w == 1 else rng.choice(ORDERS)  # a 1-row scan is the row kernel's
    sh, sw = (w, h) if order == "vh" else (h, w)
    assert _C.scan2d_chan_fit(batch, dim, groups, 1, sh, sw)
    inputs = make_inputs(rng, **cfg)
    _check_against_float64(inputs, torch.float32, 1e-5, 1e-4, (seed, cfg, origin, order),
                           delta_softplus=cfg["softplus"], origin=origin, order=order)
    with torch.no_grad():  # inference: no carries saved
        gpu = {k: None if v is None else v.to("cuda", torch.float32) for k, v in inputs.items()}
        out = scan2d(**gpu, delta_softplus=cfg["softplus"], origin=origin, order=order, backend="kernel")
        ref = scan2d(**inputs, delta_softplus=cfg["softplus"], origin=origin, order=order, backend="reference")
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("h,w", [(14, 13), (50, 45)])
@pytest.mark.parametrize("dtype,fwd_tol,grad_tol", [(torch.bfloat16, 2e-2, 5e-2), (torch.float16, 4e-3, 1e-2)])
def test_chan_kernels_half_precisions(dtype, fwd_tol, grad_tol, h, w):
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    inputs = make_inputs(rng, batch=9, dim=960, dstate=1, groups=3, height=h, width=w)
    _check_against_float64(inputs, dtype, fwd_tol, grad_tol, seed, delta_softplus=True, origin="br", order="vh")


@pytest.mark.parametrize("h,w", [(14, 14), (30, 37)])
def test_chan_kernels_deterministic_chunks(monkeypatch, h, w):
    # Deterministic chunks of a few channels each (ranges inside a warp's channels): per-channel
    # dB/dC partials, bitwise reproducible, equal to the atomics' result up to rounding.
    import sys

    monkeypatch.setattr(sys.modules["ssm2d_nn.ops.scan2d"], "DETERMINISTIC_WORKSPACE_BYTES", 9 * 7 * h * w * 4)
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    inputs = make_inputs(rng, batch=9, dim=960, dstate=1, groups=3, height=h, width=w)
    gout = torch.randn(inputs["u"].shape)
    gpu = _to(inputs, "cuda", torch.float32)
    _, fast = _run(gpu, gout, backend="kernel", delta_softplus=True, order="vh")
    torch.use_deterministic_algorithms(True)
    try:
        runs = [_run(gpu, gout, backend="kernel", delta_softplus=True, order="vh")[1] for _ in range(2)]
        _check_against_float64(inputs, torch.float32, 1e-5, 1e-4, seed, delta_softplus=True, origin="tr")
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)
    for a, b in zip(runs[0], fast):
        assert rel_err(a, b) < 1e-5


def test_deterministic_mode_is_bitwise_reproducible_and_agrees_with_atomics():
    rng = random.Random()
    inputs = make_inputs(rng, batch=2, dim=16, dstate=16, groups=2, height=70, width=45)
    gout = torch.randn(inputs["u"].shape)
    gpu = _to(inputs, "cuda", torch.float32)
    _, fast = _run(gpu, gout, backend="kernel", delta_softplus=True)
    torch.use_deterministic_algorithms(True)
    try:
        runs = [_run(gpu, gout, backend="kernel", delta_softplus=True)[1] for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(False)
    for later in runs[1:]:
        for a, b in zip(runs[0], later):
            assert torch.equal(a, b)
    for a, b in zip(runs[0], fast):
        assert rel_err(a, b) < 1e-5


def test_non_default_stream():
    rng = random.Random()
    inputs = _to(make_inputs(rng, batch=2, dim=8, dstate=4, groups=2, height=50, width=60), "cuda", torch.float32)
    expect = scan2d(**inputs, delta_softplus=True, backend="kernel").detach()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(10_000_000)  # keep the side stream busy: a launch on another stream would race ahead
        out = scan2d(**inputs, delta_softplus=True, backend="kernel")
        gout = torch.ones_like(out)
        grads = torch.autograd.grad(out, [inputs["u"], inputs["B"]], gout)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert torch.equal(out.detach(), expect)
    assert all(torch.isfinite(g).all() for g in grads)


def test_cuda_graph_capture_and_replay():
    rng = random.Random()
    static = _to(make_inputs(rng, batch=1, dim=8, dstate=16, groups=1, height=40, width=40), "cuda", torch.float32)
    static = {k: None if v is None else v.detach() for k, v in static.items()}
    gout = torch.randn_like(static["u"])
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())

    def step():
        out, _, carries = torch.ops.ssm2d.scan2d_fwd(static["u"], static["delta"], static["A"], static["B"],
                                                     static["C"], static["D"], static["z"], static["delta_bias"],
                                                     True, "tl", "hv", False)
        y = scan2d(**static, delta_softplus=True, backend="kernel")
        return out, y

    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out, g_y = step()
    fresh = make_inputs(rng, batch=1, dim=8, dstate=16, groups=1, height=40, width=40)
    for k, v in static.items():
        if v is not None:
            v.copy_(fresh[k].to(v.dtype))
    graph.replay()
    torch.cuda.synchronize()
    want = scan2d_reference(**{k: None if v is None else v.double().cpu() for k, v in static.items()},
                            delta_softplus=True)
    assert rel_err(g_out, want) < 1e-5 and rel_err(g_y, want) < 1e-5


def test_torch_compile_inductor_fullgraph():
    rng = random.Random()
    inputs = _to(make_inputs(rng, batch=2, dim=8, dstate=4, groups=4, height=24, width=31), "cuda", torch.float32)

    def f(u, delta, A, B, C, D, z, delta_bias):
        return (scan2d(u, delta, A, B, C, D, z, delta_bias, True, origin="bl", backend="kernel") ** 2).sum()

    got = torch.compile(f, fullgraph=True)(**inputs)
    g_got = torch.autograd.grad(got, list(inputs.values()))
    want = f(**inputs)
    g_want = torch.autograd.grad(want, list(inputs.values()))
    assert rel_err(got, want) < 1e-5
    for a, b in zip(g_got, g_want):
        assert rel_err(a, b) < 1e-4


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_second_device_is_used_and_current_device_restored():
    rng = random.Random()
    inputs = make_inputs(rng, batch=1, dim=4, dstate=4, groups=1, height=20, width=20)
    torch.cuda.set_device(0)
    out = scan2d(**_to(inputs, "cuda:1", torch.float32), delta_softplus=True, backend="kernel")
    assert out.device == torch.device("cuda", 1) and torch.cuda.current_device() == 0
    assert rel_err(out, scan2d_reference(**inputs, delta_softplus=True)) < 1e-5


def test_more_than_2_31_elements():
    # 524,289 x 64 x 64 = 2,147,549,184 elements per (batch, 1, H, W) tensor in float16: offsets past
    # 2^31 are only right with 64-bit index arithmetic (and the batch exceeds one launch's grid).
    b, h, w = 524_289, 64, 64
    gen = torch.Generator(device="cuda").manual_seed(random.randrange(2**31))
    u = torch.randn(b, 1, h, w, device="cuda", dtype=torch.float16, generator=gen)
    delta = torch.rand(b, 1, h, w, device="cuda", dtype=torch.float16, generator=gen) * 0.5
    B = torch.randn(b, 1, 1, h, w, device="cuda", dtype=torch.float16, generator=gen)
    C = torch.randn(b, 1, 1, h, w, device="cuda", dtype=torch.float16, generator=gen)
    A = -torch.rand(1, 1, device="cuda") - 0.1
    assert u.numel() > 2**31
    out = scan2d(u, delta, A, B, C, delta_softplus=True, backend="kernel")
    for sl in (slice(0, 2), slice(b - 2, b)):
        ref = scan2d_reference(u[sl].double().cpu(), delta[sl].double().cpu(), A.double().cpu(), B[sl].double().cpu(),
                               C[sl].double().cpu(), delta_softplus=True)
        assert rel_err(out[sl], ref) < 4e-3, sl
    del u, delta, B, C, out
    torch.cuda.empty_cache()


def test_float64_on_cuda_is_refused_by_the_kernel_and_auto_uses_the_reference():
    rng = random.Random()
    inputs = {k: None if v is None else v.cuda() for k, v in make_inputs(rng, batch=1, dim=4, dstate=2, groups=1,
                                                                          height=5, width=6).items()}
    with pytest.raises(BackendUnavailableError, match="not float64"):
        scan2d(**inputs, backend="kernel")
    assert rel_err(scan2d(**inputs), scan2d_reference(**inputs)) < 1e-12


def test_mixed_devices_raise():
    u = torch.randn(1, 4, 5, 6, device="cuda")
    with pytest.raises(ValueError, match="delta is on cpu but u is on cuda"):
        scan2d(u, torch.randn(1, 4, 5, 6), -torch.rand(4, 2, device="cuda"), torch.randn(1, 1, 2, 5, 6, device="cuda"),
               torch.randn(1, 1, 2, 5, 6, device="cuda"))


@pytest.mark.parametrize("origin,order", list(itertools.product(ORIGINS, ORDERS)))
def test_inference_kernel_matches_float64_reference(origin, order):
    # Without a backward to follow the forward saves nothing (no carries); it must compute the same
    # function on one band (32, 64 or 128 columns), several bands (summaries) and N > 64 (passes).
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    shapes = [(1, 1), (1, 7), (1, 1000), (1, 3137), (56, 56), (5, 33), (100, 17), (9, 64), (64, 9), (3, 1),
              (7, 300), (40, 129), (3, 70)]
    for (h, w), dstate in zip(shapes, [1, 3, 16, 4, 1, 16, 2, 1, 16, 8, 16, 5, 80]):
        dim = rng.choice([4, 8, 130])
        groups = rng.choice([g for g in (1, 2, dim) if dim % g == 0])
        cfg = dict(batch=rng.randint(1, 2), dim=dim, dstate=dstate, groups=groups, height=h, width=w,
                   with_D=rng.random() < 0.7, with_z=rng.random() < 0.6, with_bias=rng.random() < 0.6,
                   softplus=rng.random() < 0.7)
        inputs = make_inputs(rng, **cfg)
        softplus = inputs.pop("softplus", cfg["softplus"])
        ref = scan2d(**_to(inputs, "cpu", torch.float64), delta_softplus=softplus, origin=origin, order=order,
                     backend="reference")
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
            gpu = {k: None if v is None else v.to("cuda", torch.float32 if k in ("A", "D", "delta_bias") else dtype)
                   for k, v in inputs.items()}
            with torch.no_grad():
                out = scan2d(**gpu, delta_softplus=softplus, origin=origin, order=order, backend="kernel")
            assert rel_err(out, ref) < tol, f"seed={seed} {cfg} {dtype}: {rel_err(out, ref):.2e}"


def _softplus_through_scan(v: torch.Tensor, n: int, groups: int) -> torch.Tensor:
    """scan2d's output for delta = v (batch, D, H, W) with every decay 0 (A = -1e30), u = B = 1, C = 1 for
    the first state and 0 for the others, D and z absent: y = dt = softplus(v) as the kernel computes
    it, cell by cell."""
    b, d, h, w = v.shape
    u = torch.ones(b, d, h, w, device=v.device)
    B = torch.ones(b, groups, n, h, w, device=v.device)
    C = torch.zeros(b, groups, n, h, w, device=v.device)
    C[:, :, 0] = 1
    A = torch.full((d, n), -1e30, device=v.device)
    with torch.no_grad():
        return scan2d(u, v, A, B, C, delta_softplus=True, backend="kernel")


# Shapes that run the row (N = 1, one row), band (N = 4) and lanes (N = 16) kernels; the chan kernels
# (N = 1 on small 2D grids with many warps) use the hardware log2 on purpose (absolute error ~1e-7).
@pytest.mark.parametrize("n,shape", [(1, (1, 4, 1, 4096)), (4, (1, 4, 64, 64)), (16, (1, 16, 64, 64))],
                         ids=["row", "band", "lanes"])
def test_softplus_relative_accuracy(n, shape):
    # dt = softplus(delta) on fresh random delta in [-30, 30], against float64 on the same float32 values:
    # relative error within 4e-6 everywhere (the exponent's rounding gives ~1.5e-6 at -30, and dt as
    # small as 1e-13 there, so an absolute-error approximation would fail).
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    v = (torch.rand(shape, generator=gen, dtype=torch.float64) * 60 - 30).float()
    out = _softplus_through_scan(v.cuda(), n, 1).cpu().double()
    ref = torch.nn.functional.softplus(v.double())
    err = ((out - ref).abs() / ref).max().item()
    assert err < 4e-6, f"seed={seed}: softplus relative error {err:.2e}"


@pytest.mark.parametrize("deterministic", [False, True])
def test_one_row_routes_backward(deterministic):
    # N = 1 on a 1-row scanned grid (VMamba's 1D routes; an H x 1 grid in order "vh" scans as 1 x H) runs
    # the row backward (8 lanes per channel, 32-column super-chunks): rows of one chunk, of a partial
    # last super-chunk and of many (vector accesses where rows are aligned: widths a multiple of 4);
    # warps whose 4 channels share a group (dB, dC summed across the lanes), warps across two groups
    # and warps with idle lanes; with and without z, softplus, D, delta_bias; deterministic mode
    # stores per-channel partials.
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    cases = [(1, 3000, 32, 2, "hv"), (1, 97, 16, 1, "hv"), (1, 1000, 24, 3, "hv"), (33, 1, 8, 8, "vh"),
             (1, 129, 16, 2, "hv"), (1, 20, 40, 5, "hv"), (1, 3136, 64, 1, "hv"), (1, 1000, 96, 2, "hv"),
             (1, 13, 70, 2, "hv"), (200, 1, 64, 2, "vh")]
    for h, w, dim, groups, order in cases:
        cfg = dict(batch=rng.randint(1, 3), dim=dim, dstate=1, groups=groups, height=h, width=w,
                   with_D=rng.random() < 0.7, with_z=rng.random() < 0.7, with_bias=rng.random() < 0.7,
                   softplus=rng.random() < 0.7)
        inputs = make_inputs(rng, **cfg)
        torch.use_deterministic_algorithms(deterministic)
        try:
            _check_against_float64(inputs, torch.float32, 1e-5, 1e-4, (seed, cfg), delta_softplus=cfg["softplus"],
                                   origin=rng.choice(ORIGINS), order=order)
        finally:
            torch.use_deterministic_algorithms(False)
    inputs = make_inputs(rng, batch=2, dim=64, dstate=1, groups=2, height=1, width=3136)
    _check_against_float64(inputs, torch.bfloat16, 2e-2, 5e-2, seed, delta_softplus=True)
