"""wavefront2d on the CPU: kernel against the float64 reference, the reference against closed forms."""

from __future__ import annotations

import math
import random

import pytest
import torch

from wavefront2d_cases import NAMES, ORIGINS, make_wave_inputs, random_wave_config, rel_err
from ssm2d_nn.ops import wavefront2d, wavefront2d_reference


def _grads(out, inputs, gout):
    return torch.autograd.grad(out, [inputs[k] for k in NAMES if inputs[k] is not None], gout)


@pytest.mark.parametrize("origin", ORIGINS)
def test_cpu_kernel_matches_reference_forward_and_all_gradients(origin):
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    for _ in range(5):
        cfg = random_wave_config(rng, max_hw=40)
        inputs = make_wave_inputs(rng, **cfg)
        for v in inputs.values():
            if v is not None:
                v.requires_grad_(True)
        out_k = wavefront2d(**inputs, origin=origin, backend="kernel")
        out_r = wavefront2d_reference(**inputs, origin=origin)
        ctx = f"seed={seed} cfg={cfg}"
        assert rel_err(out_k, out_r) < 1e-12, ctx
        gout = torch.randn_like(out_r)
        names = [k for k in NAMES if inputs[k] is not None]
        for name, a, b in zip(names, _grads(out_k, inputs, gout), _grads(out_r, inputs, gout)):
            if b.abs().max() == 0:  # e.g. H = 1: nothing flows through the T path
                assert a.abs().max() == 0, f"d{name} should be zero: {ctx}"
            else:
                assert rel_err(a, b) < 1e-10, f"d{name}: {ctx}"


def test_impulse_response_is_binomial_with_unaveraged_borders():
    # Constant gates, B only at the origin, C = 1, u = 1: the interior response is
    # C(k+m, k) (aT/2)^k (aL/2)^m relative to the first row/column rules of SCANS.md.
    H, W = 6, 7
    aT, aL = 0.8, 0.6
    dT = dL = 0.5
    AT, AL = math.log(aT) / dT, math.log(aL) / dL
    u = torch.ones(1, H, W, 1, dtype=torch.float64)
    BT = torch.zeros(1, H, W, 1, dtype=torch.float64)
    BL = torch.zeros(1, H, W, 1, dtype=torch.float64)
    BL[0, 0, 0, 0] = 1.0 / dL  # vL = dL * BL * u = 1 at the origin, no input anywhere else
    C = torch.ones(1, H, W, 1, dtype=torch.float64)
    args = (u, torch.full_like(u, dT), torch.full_like(u, dL), torch.tensor([[AT]], dtype=torch.float64),
            torch.tensor([[AL]], dtype=torch.float64), BT, BL, C)
    expect = torch.zeros(H, W, dtype=torch.float64)
    for i in range(H):
        for j in range(W):
            if i == 0:
                expect[i, j] = aL**j  # first row: left neighbour only, no 1/2
            elif j == 0:
                expect[i, j] = aT**i  # first column: top neighbour only, no 1/2
            else:
                expect[i, j] = 0.5 * (aL * expect[i, j - 1] + aT * expect[i - 1, j])
    # The interior in closed form: paths leave the first row or column once, then halve at every step.
    for i in range(1, H):
        for j in range(1, W):
            from_row = sum(aL**jj * aT * 0.5 * math.comb((i - 1) + (j - jj), i - 1) * (aT / 2) ** (i - 1) * (aL / 2) ** (j - jj)
                           for jj in range(1, j + 1))
            from_col = sum(aT**ii * aL * 0.5 * math.comb((i - ii) + (j - 1), j - 1) * (aT / 2) ** (i - ii) * (aL / 2) ** (j - 1)
                           for ii in range(1, i + 1))
            assert math.isclose(expect[i, j].item(), from_row + from_col, rel_tol=1e-12)
    ref = wavefront2d_reference(*args)[0, :, :, 0]
    ker = wavefront2d(*args, backend="kernel")[0, :, :, 0]
    assert rel_err(ref, expect) < 1e-13 and rel_err(ker, expect) < 1e-13


def test_br_origin_is_tl_on_the_flipped_grid():
    rng = random.Random()
    inputs = make_wave_inputs(rng, batch=1, height=9, width=12, dim=4, dstate=4, groups=2)
    flipped = {k: (v.flip(1, 2) if v is not None and v.dim() >= 4 else v) for k, v in inputs.items()}
    br = wavefront2d(**inputs, origin="br", backend="kernel")
    tl = wavefront2d(**flipped, origin="tl", backend="kernel").flip(1, 2)
    assert rel_err(br, tl) < 1e-13
    assert rel_err(br, wavefront2d(**inputs, backend="kernel")) > 1e-3


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
def test_cpu_kernel_low_precision_against_float64(dtype, tol):
    rng = random.Random()
    inputs = make_wave_inputs(rng, batch=1, height=20, width=27, dim=8, dstate=16)
    low = {k: None if v is None else v.to(torch.float32 if k in ("AT", "AL", "D") else dtype) for k, v in inputs.items()}
    out = wavefront2d(**low, backend="kernel")
    assert out.dtype == dtype and rel_err(out, wavefront2d_reference(**inputs)) < tol


def test_cpu_frame_accumulates_and_refuses_the_dtype_output_path():
    # On CUDA the lane kernels write the output in u's dtype; the CPU kernel adds into a float32
    # accumulator, so a CPU frame never takes that path and the compiled call refuses it by name.
    from ssm2d_kernels import _C
    from ssm2d_nn.ops import _wavefront2d_kernel as K

    inputs = make_wave_inputs(random.Random(), batch=1, height=5, width=6, dim=16, dstate=4)
    low = {k: None if v is None else v.float() for k, v in inputs.items()}
    args = tuple(low[k] for k in ("u", "dT", "dL", "AT", "AL", "BT", "BL", "C", "D"))
    f = K.frame(args, "tl", torch.float32)
    assert f.out_in_dtype is False
    out = torch.empty_like(low["u"])
    with pytest.raises(ValueError, match="out_in_dtype is a CUDA path"):
        _C.wavefront2d_forward_at(f.call, *K.operands(f, args), 0, out.data_ptr(), True)
    acc = torch.zeros_like(low["u"])
    _C.wavefront2d_forward_at(f.call, *K.operands(f, args), 0, acc.data_ptr(), False)
    assert rel_err(acc, wavefront2d_reference(**inputs)) < 1e-5


def test_backward_is_bitwise_deterministic_and_compiles():
    rng = random.Random()
    inputs = make_wave_inputs(rng, batch=2, height=9, width=11, dim=4, dstate=4, groups=2, dtype=torch.float32)
    for v in inputs.values():
        v.requires_grad_(True)
    gout = torch.randn(2, 9, 11, 4)
    runs = [_grads(wavefront2d(**inputs, backend="kernel"), inputs, gout) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)

    def f(**kw):
        return (wavefront2d(**kw, origin="br", backend="kernel") * gout).sum()

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(**inputs)
    g_got = torch.autograd.grad(got, list(inputs.values()))
    g_want = torch.autograd.grad(f(**inputs), list(inputs.values()))
    for a, b in zip(g_got, g_want):
        assert rel_err(a, b) < 1e-6


BAD = [
    (dict(u=torch.randn(2, 5, 6)), ValueError, r"u must have shape \(batch, H, W, E\)"),
    (dict(dT=torch.rand(2, 5, 6, 3)), ValueError, r"dT must have shape \(batch, H, W, E\) = \(2, 5, 6, 4\)"),
    (dict(AL=-torch.rand(4, 3)), ValueError, r"AL must have shape \(E, N\) = \(4, 2\) like AT"),
    (dict(BT=torch.randn(2, 5, 6, 3, 2)), ValueError, r"BT must have shape .* with G dividing E=4"),
    (dict(C=torch.randn(2, 5, 6, 3)), ValueError, r"C must have shape \(batch, H, W, N\) = \(2, 5, 6, 2\)"),
    (dict(D=torch.randn(5)), ValueError, r"D must have shape \(E,\) = \(4,\)"),
    (dict(u=torch.randint(0, 2, (2, 5, 6, 4))), TypeError, r"u must be float32"),
    (dict(dL=torch.rand(2, 5, 6, 4, dtype=torch.float64)), TypeError, r"dL must have the dtype of u"),
    (dict(D=torch.randn(4, device="meta")), ValueError, r"D is on meta but u is on cpu"),
    (dict(origin="middle"), ValueError, r"origin must be one of"),
]


@pytest.mark.parametrize("override,exc,msg", BAD)
def test_bad_inputs_raise_naming_the_argument(override, exc, msg):
    args = dict(u=torch.randn(2, 5, 6, 4), dT=torch.rand(2, 5, 6, 4), dL=torch.rand(2, 5, 6, 4), AT=-torch.rand(4, 2),
                AL=-torch.rand(4, 2), BT=torch.randn(2, 5, 6, 2), BL=torch.randn(2, 5, 6, 2), C=torch.randn(2, 5, 6, 2),
                D=None)
    args.update(override)
    with pytest.raises(exc, match=msg):
        wavefront2d(**args)


def test_backward_reads_a_gradient_handed_in_another_dtype():
    # The kernels read dout in u's dtype: a float32 gradient of bfloat16 inputs (autograd hands a node
    # its output's gradient in the output's dtype) must give exactly what the same values in bfloat16 give.
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    x = make_wave_inputs(rng, batch=2, height=rng.randint(1, 9), width=rng.randint(1, 9), dim=6, dstate=3)
    x = {k: None if v is None else v.to(torch.float32 if k in ("AT", "AL", "D") else torch.bfloat16)
         for k, v in x.items()}
    dout16 = torch.randn(x["u"].shape, dtype=torch.float64).to(torch.bfloat16)
    args = [x[k] for k in ("u", "dT", "dL", "AT", "AL", "BT", "BL", "C", "D")]
    run = lambda g: torch.ops.ssm2d.wavefront2d_bwd(g, *args, "tl", False)  # noqa: E731
    for name, a, b in zip(("du", "ddT", "ddL", "dAT", "dAL", "dBT", "dBL", "dC", "dD"), run(dout16.float()), run(dout16)):
        assert torch.equal(a, b), f"{name} seed={seed}"
