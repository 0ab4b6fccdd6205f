"""wavefront2d on CUDA against the float64 reference; chunks, transposes, streams, graphs, offsets."""

from __future__ import annotations

import importlib
import os
import random
import subprocess
import sys

import pytest
import torch

from wavefront2d_cases import NAMES, ORIGINS, make_wave_inputs, random_wave_config, rel_err
from ssm2d_nn import BackendUnavailableError
from ssm2d_nn.ops import wavefront2d, wavefront2d_reference

pytestmark = pytest.mark.gpu


def _to(inputs, device, dtype):
    return {k: None if v is None else v.detach().to(device=device, dtype=torch.float32 if k in ("AT", "AL", "D") else dtype)
            .requires_grad_(True) for k, v in inputs.items()}


def _run(inputs, gout, **kw):
    out = wavefront2d(**inputs, **kw)
    return out, torch.autograd.grad(out, [inputs[k] for k in NAMES if inputs[k] is not None],
                                    gout.to(out.device, out.dtype))


def _check(inputs64, dtype, fwd_tol, grad_tol, ctx, **kw):
    gout = torch.randn(inputs64["u"].shape, dtype=torch.float64)
    out_r, g_r = _run(_to(inputs64, "cpu", torch.float64), gout, backend="reference", **kw)
    out_k, g_k = _run(_to(inputs64, "cuda", dtype), gout, backend="kernel", **kw)
    assert out_k.is_cuda and out_k.dtype == dtype
    assert rel_err(out_k, out_r) < fwd_tol, f"forward {ctx}: {rel_err(out_k, out_r):.2e}"
    for name, a, b in zip([k for k in NAMES if inputs64[k] is not None], g_k, g_r):
        assert torch.isfinite(a).all(), f"d{name} {ctx}"
        if b.abs().max() == 0:
            assert a.abs().max() == 0, f"d{name} should be zero {ctx}"
        else:
            assert rel_err(a, b) < grad_tol, f"d{name} {ctx}: {rel_err(a, b):.2e}"


@pytest.mark.parametrize("origin", ORIGINS)
def test_float32_matches_float64_reference(origin):
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    for _ in range(4):
        cfg = random_wave_config(rng)
        _check(make_wave_inputs(rng, **cfg), torch.float32, 1e-5, 1e-4, (seed, cfg), origin=origin)


@pytest.mark.parametrize("dtype,fwd_tol,grad_tol", [(torch.bfloat16, 2e-2, 5e-2), (torch.float16, 4e-3, 1e-2)])
def test_half_precisions(dtype, fwd_tol, grad_tol):
    rng = random.Random()
    _check(make_wave_inputs(rng, batch=2, height=40, width=33, dim=8, dstate=16, groups=2), dtype, fwd_tol, grad_tol,
           dtype, origin="br")


@pytest.mark.parametrize("h,w,n", [(130, 120, 16), (3, 700, 20), (200, 1, 4), (2, 2100, 2), (70, 1025, 2)])
def test_shapes_state_chunks_and_long_rows(h, w, n):
    # N = 20 runs as two state chunks; W = 2100 is scanned transposed; W = 1025 uses the widest rows.
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    _check(make_wave_inputs(rng, batch=1, height=h, width=w, dim=2, dstate=n), torch.float32, 1e-5, 1e-4, seed)


def _check_deterministic(inputs, monkeypatch=None, chunk_bytes=None):
    """Three deterministic backward runs agree bitwise and with the atomic one (optionally with the
    deterministic channel chunks forced to ``chunk_bytes`` of per-channel partials)."""
    gout = torch.randn(inputs["u"].shape, device="cuda")
    _, fast = _run(inputs, gout, backend="kernel")
    if chunk_bytes is not None:
        wave_module = importlib.import_module("ssm2d_nn.ops.wavefront2d")  # the module, not the function
        monkeypatch.setattr(wave_module, "DETERMINISTIC_WORKSPACE_BYTES", chunk_bytes)
    torch.use_deterministic_algorithms(True)
    try:
        runs = [_run(inputs, gout, backend="kernel")[1] for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(False)
    for later in runs[1:]:
        for a, b in zip(runs[0], later):
            assert torch.equal(a, b)
    for a, b in zip(runs[0], fast):
        assert rel_err(a, b) < 1e-5


def test_deterministic_mode_is_bitwise_reproducible():
    rng = random.Random()
    _check_deterministic(_to(make_wave_inputs(rng, batch=2, height=37, width=45, dim=8, dstate=16, groups=1), "cuda",
                             torch.float32))


def test_non_default_stream_and_graph_replay():
    rng = random.Random()
    static = {k: v.detach() for k, v in _to(make_wave_inputs(rng, batch=1, height=30, width=50, dim=4, dstate=16),
                                            "cuda", torch.float32).items()}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(10_000_000)
        out_side = wavefront2d(**static, backend="kernel")
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(out_side, wavefront2d(**static, backend="kernel"))
    with torch.cuda.stream(side):
        for _ in range(2):
            wavefront2d(**static, backend="kernel")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out = wavefront2d(**static, backend="kernel")
    fresh = make_wave_inputs(rng, batch=1, height=30, width=50, dim=4, dstate=16)
    for k, v in static.items():
        v.copy_(fresh[k].to(v.dtype))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(g_out, wavefront2d_reference(**fresh)) < 1e-5


def test_torch_compile_inductor_fullgraph():
    rng = random.Random()
    inputs = _to(make_wave_inputs(rng, batch=2, height=12, width=19, dim=4, dstate=4), "cuda", torch.float32)

    def f(**kw):
        return (wavefront2d(**kw, origin="br", backend="kernel") ** 2).sum()

    got = torch.compile(f, fullgraph=True)(**inputs)
    g_got = torch.autograd.grad(got, list(inputs.values()))
    g_want = torch.autograd.grad(f(**inputs), list(inputs.values()))
    for a, b in zip(g_got, g_want):
        assert rel_err(a, b) < 1e-4


def test_more_than_2_31_elements():
    # u, dT, dL of 1 x 1024 x 1024 x 2049 half values: offsets of the last rows pass 2^31.
    b, h, w, e = 1, 1024, 1024, 2049
    gen = torch.Generator(device="cuda").manual_seed(random.randrange(2**31))
    u = torch.randn(b, h, w, e, device="cuda", dtype=torch.float16, generator=gen)
    dT = (torch.rand(b, h, w, e, device="cuda", dtype=torch.float16, generator=gen) * 0.5 + 0.05)
    dL = (torch.rand(b, h, w, e, device="cuda", dtype=torch.float16, generator=gen) * 0.5 + 0.05)
    BT, BL, C = (torch.randn(b, h, w, 1, device="cuda", dtype=torch.float16, generator=gen) for _ in range(3))
    AT = -torch.rand(e, 1, device="cuda") - 0.5
    AL = -torch.rand(e, 1, device="cuda") - 0.5
    assert u.numel() > 2**31
    out = wavefront2d(u, dT, dL, AT, AL, BT, BL, C, backend="kernel")
    sl = slice(e - 2, e)  # channels are independent: check the last ones against the reference
    rows = slice(h - 64, h)  # rows far from the top only depend on nearby rows through decaying paths...
    ref = wavefront2d_reference(*(x[..., sl].double().cpu() for x in (u, dT, dL)), AT[sl].double().cpu(),
                                AL[sl].double().cpu(), BT.double().cpu(), BL.double().cpu(), C.double().cpu())
    assert rel_err(out[..., sl], ref) < 4e-3
    assert rel_err(out[:, rows, :, sl], ref[:, rows]) < 4e-3
    del u, dT, dL, out
    torch.cuda.empty_cache()


@pytest.mark.parametrize("origin", ["tl", "br"])
def test_both_sides_longer_than_2048(origin):
    # N <= 16 scans a grid with both sides > 2048 as it is, in column strips (no transpose, no
    # refusal): forward and every gradient against the CPU kernel in float64 (a second implementation,
    # itself checked against the reference), on fresh random inputs.
    seed = random.randrange(2**31)
    inputs64 = make_wave_inputs(random.Random(seed), batch=1, height=2050, width=2060, dim=16, dstate=2)
    gout = torch.randn(inputs64["u"].shape, dtype=torch.float64)
    out_c, g_c = _run(_to(inputs64, "cpu", torch.float64), gout, backend="kernel", origin=origin)
    out_k, g_k = _run(_to(inputs64, "cuda", torch.float32), gout, backend="kernel", origin=origin)
    assert rel_err(out_k, out_c) < 1e-5, (seed, rel_err(out_k, out_c))
    for name, a, b in zip(NAMES, g_k, g_c):
        assert rel_err(a, b) < 1e-4, (seed, name, rel_err(a, b))
    del out_k, g_k
    torch.cuda.empty_cache()
    # N > 16 runs the general kernel, which holds a row in registers: still refused, by name.
    big = {k: v.cuda().float() for k, v in make_wave_inputs(random.Random(seed), batch=1, height=2049, width=2049,
                                                             dim=1, dstate=17).items()}
    with pytest.raises(BackendUnavailableError, match="both sides > 2048"):
        wavefront2d(**big, backend="kernel")


def test_float64_refused_by_the_kernel_and_mixed_devices_raise():
    rng = random.Random()
    inputs = {k: v.cuda() for k, v in make_wave_inputs(rng, batch=1, height=4, width=5, dim=2, dstate=2).items()}
    with pytest.raises(BackendUnavailableError, match="not float64"):
        wavefront2d(**inputs, backend="kernel")
    assert rel_err(wavefront2d(**inputs), wavefront2d_reference(**inputs)) < 1e-12
    inputs32 = {k: v.float() for k, v in inputs.items()}
    inputs32["dL"] = inputs32["dL"].cpu()
    with pytest.raises(ValueError, match="dL is on cpu but u is on cuda"):
        wavefront2d(**inputs32)


@pytest.mark.parametrize("origin", ORIGINS)
def test_short_rows_at_model_shapes(origin):
    # W <= 64 with N <= 16 and >= 16 blocks of 16 channels runs the short-row forward (one group per block):
    # channel tails (E = 40), grouped states (E / G = 16), W on both sides of 16 / 32 / 64, N < 16.
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    # The backward recomputes h in 8-row segments up to 128 rows: H = 1, 8, 9, 17 and 37 cover one, whole and
    # partial segments.
    for h, w, e, n, g in [(9, 1, 40, 16, None), (5, 16, 16, 3, 1), (7, 17, 40, 16, None), (6, 33, 64, 16, 4),
                          (12, 56, 32, 16, None), (3, 64, 48, 1, 3), (4, 65, 16, 16, None), (1, 50, 20, 8, 1),
                          (37, 23, 16, 16, None), (8, 31, 32, 5, 2), (17, 56, 16, 16, 1)]:
        blocks_per_item = -(-e // 16)
        cfg = dict(batch=-(-16 // blocks_per_item), height=h, width=w, dim=e, dstate=n, groups=g)  # >= 16 blocks
        _check(make_wave_inputs(rng, **cfg), torch.float32, 1e-5, 1e-4, (seed, cfg), origin=origin)
    _check(make_wave_inputs(rng, batch=4, height=28, width=28, dim=64, dstate=16), torch.bfloat16, 2e-2, 5e-2,
           (seed, "bf16 28x28"), origin=origin)


def test_short_rows_read_strided_inputs():
    # A (b, E, H, W) tensor seen channels-last through a permute: the kernel follows the strides.
    rng = random.Random()
    inputs = make_wave_inputs(rng, batch=8, height=11, width=23, dim=32, dstate=16)
    gout = torch.randn(inputs["u"].shape, dtype=torch.float64)
    ref, _ = _run(_to(inputs, "cpu", torch.float64), gout, backend="reference")
    cuda = _to(inputs, "cuda", torch.float32)
    with torch.no_grad():
        for k in ("u", "dT", "dL"):
            cuda[k] = cuda[k].permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    out = wavefront2d(**cuda, backend="kernel")
    assert rel_err(out, ref) < 1e-5


def test_short_rows_deterministic_in_channel_chunks(monkeypatch):
    # Deterministic short-row backward: per-block dB partials, channels run in chunks of 16 (forced small).
    rng = random.Random()
    b, h, w, e, n = 8, 10, 20, 48, 16
    inputs = _to(make_wave_inputs(rng, batch=b, height=h, width=w, dim=e, dstate=n, groups=1), "cuda", torch.float32)
    _check_deterministic(inputs, monkeypatch, chunk_bytes=20 * 3 * b * h * w * n * 4)  # 16-channel chunks


@pytest.mark.parametrize("origin", ["tl", "br"])
def test_column_strips(origin):
    # N <= 16 with rows longer than 64 cells, or too few (batch, 16-channel) blocks, runs forward and
    # backward as column strips pipelined across blocks (the forward from the left, the adjoint from the
    # right): strip widths 8 (few blocks), 16 (1 x 4 x 38 strips), 32 (6 x 4 blocks x 13 strips: more
    # blocks than the GPU holds at once) and 64 (8 x 4 x 10), ragged last strips, channel tails, groups.
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    for b, h, w, e, n, g in [(1, 33, 64, 64, 16, None), (2, 20, 200, 40, 16, None), (1, 9, 300, 32, 5, 2),
                             (3, 17, 130, 16, 16, 1), (6, 4, 400, 64, 4, 4), (1, 70, 17, 8, 16, None),
                             (1, 5, 600, 64, 16, None), (8, 3, 600, 64, 8, 2)]:
        cfg = dict(batch=b, height=h, width=w, dim=e, dstate=n, groups=g)
        _check(make_wave_inputs(rng, **cfg), torch.float32, 1e-5, 1e-4, (seed, cfg), origin=origin)
    _check(make_wave_inputs(rng, batch=1, height=48, width=256, dim=64, dstate=16), torch.bfloat16, 2e-2, 5e-2,
           (seed, "bf16 48x256"), origin=origin)


def test_column_strips_deterministic_in_channel_chunks(monkeypatch):
    # The strip backward in deterministic mode: per-block dB partials, dAT/dAL/dD summed over the strips in
    # a fixed order, channels in chunks of 16 (forced small): bitwise repeatable and equal to the atomics.
    rng = random.Random()
    b, h, w, e, n = 2, 12, 150, 48, 16
    inputs = _to(make_wave_inputs(rng, batch=b, height=h, width=w, dim=e, dstate=n, groups=1), "cuda", torch.float32)
    _check_deterministic(inputs, monkeypatch, chunk_bytes=20 * 3 * b * h * w * n * 4)  # 16-channel chunks


def test_tall_grids_in_longer_segments():
    # Past 128 rows the backward recomputes h in segments of K rows with 2 K^2 >= H (16 at 300 rows,
    # 32 at 520): whole and partial segments, in column strips and on whole rows (>= 16 blocks).
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    for b, h, w, e, n, g in [(1, 300, 100, 32, 16, None), (1, 520, 24, 16, 4, 1), (16, 257, 20, 16, 16, None),
                             (2, 130, 70, 48, 8, 3)]:
        cfg = dict(batch=b, height=h, width=w, dim=e, dstate=n, groups=g)
        _check(make_wave_inputs(rng, **cfg), torch.float32, 1e-5, 1e-4, (seed, cfg), origin=rng.choice(ORIGINS))


def test_column_strips_in_channel_chunks(request):
    # A strip backward whose workspace would pass the bound (256 MiB) runs its channels in chunks of
    # 16-channel blocks, one recompute + adjoint launch pair each. SSM2D_WAVE_BWD_BUDGET (bytes, read
    # once per process) lowers the bound to 1 byte in a child process, so every strip backward runs
    # one block per launch: the strip tests and the tall-grid test above, deterministic mode included,
    # must pass there as they do here.
    if os.environ.get("SSM2D_WAVE_BWD_BUDGET"):
        pytest.skip("already in the child process")
    here = str(request.path)
    tests = ["test_column_strips", "test_column_strips_deterministic_in_channel_chunks",
             "test_tall_grids_in_longer_segments", "test_array_api_accumulators_equal_the_ops_dtype_outputs"]
    env = dict(os.environ, SSM2D_WAVE_BWD_BUDGET="1")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                          *(f"{here}::{t}" for t in tests)], env=env, capture_output=True, text=True,
                         cwd=str(request.config.rootpath))
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "failed" not in run.stdout, run.stdout[-2000:]


@pytest.mark.parametrize("h,w,b,e", [(20, 150, 1, 32), (9, 40, 16, 16)])
def test_array_api_accumulators_equal_the_ops_dtype_outputs(h, w, b, e):
    # ssm2d-nn's op has the lane kernels write out, du, ddT, ddL in u's dtype; the kernels' array API
    # keeps the float32 accumulators the kernels ADD into. Both paths, one on column strips (B = 1) and
    # one on whole rows (16 blocks): the accumulators, pre-filled with noise, gain exactly what the op
    # returns (same arithmetic, float32 inputs).
    from ssm2d_kernels.wavefront2d import wavefront2d_backward, wavefront2d_forward, wavefront2d_workspace_floats

    rng = random.Random()
    x = _to(make_wave_inputs(rng, batch=b, height=h, width=w, dim=e, dstate=16), "cuda", torch.float32)
    gout = torch.randn(b, h, w, e, device="cuda")
    out_op, grads_op = _run(x, gout, backend="kernel", origin="br")
    plain = {k: None if v is None else v.detach() for k, v in x.items()}
    ws = lambda bwd: torch.empty(wavefront2d_workspace_floats(b, e, 16, h, w, 0, backward=bwd),  # noqa: E731
                                 dtype=torch.float32, device="cuda")
    noise = lambda: torch.randn(b, h, w, e, device="cuda")  # noqa: E731
    out0 = noise()
    out = out0.clone()
    wavefront2d_forward(**plain, out=out, origin="br", workspace=ws(False))
    torch.cuda.synchronize()
    assert rel_err(out - out0, out_op) < 1e-5
    cells0 = {k: noise() for k in ("du", "ddT", "ddL")}
    cells = {k: v.clone() for k, v in cells0.items()}
    bn = {k: torch.zeros(b, h, w, 1, 16, device="cuda") for k in ("dBT", "dBL", "dC")}  # (batch, H, W, G, N)
    parts = dict(dAT_part=torch.zeros(b, e, 16, device="cuda"), dAL_part=torch.zeros(b, e, 16, device="cuda"),
                 dD_part=torch.zeros(b, e, device="cuda"))
    wavefront2d_backward(gout, **plain, **cells, **bn, **parts, origin="br", workspace=ws(True))
    torch.cuda.synchronize()
    got = dict(u=cells["du"] - cells0["du"], dT=cells["ddT"] - cells0["ddT"], dL=cells["ddL"] - cells0["ddL"],
               AT=parts["dAT_part"].sum(0), AL=parts["dAL_part"].sum(0), BT=bn["dBT"].view(b, h, w, 16),
               BL=bn["dBL"].view(b, h, w, 16), C=bn["dC"].view(b, h, w, 16),
               D=parts["dD_part"].sum(0))
    for name, g in zip([k for k in NAMES if x[k] is not None], grads_op):
        assert rel_err(got[name], g) < 1e-5, f"d{name} ({h}x{w}, batch {b}, E {e}): {rel_err(got[name], g):.2e}"
