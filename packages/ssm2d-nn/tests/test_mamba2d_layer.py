"""TwoDMambaLayer against a hand-written float64 loop implementation, and its mask semantics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ssm2d_nn.layers import TwoDMambaLayer
from ssm2d_nn.layers.mamba2d import masked_softplus


def _softplus(v):
    return torch.where(v > 20, v, torch.log1p(torch.exp(v)))


def _silu(v):
    return v / (1 + torch.exp(-v))


def _local_part(layer, x, mask):
    """in_proj, mask, depthwise conv (explicit shifted sums), SiLU: channels-first (b, E, H, W)."""
    b, c, h, w = x.shape
    e = layer.d_inner
    wx, wz = layer.in_proj.weight[:e], layer.in_proj.weight[e:]
    xi = torch.einsum("ec,bchw->behw", wx, x) * mask[:, None]
    z = torch.einsum("ec,bchw->behw", wz, x)
    kh, kw = layer.conv.kernel_size
    padded = torch.zeros(b, e, h + kh - 1, w + kw - 1, dtype=x.dtype)
    padded[:, :, kh // 2:kh // 2 + h, kw // 2:kw // 2 + w] = xi
    conv = layer.conv.bias[None, :, None, None].expand(b, e, h, w).clone()
    for di in range(kh):
        for dj in range(kw):
            conv = conv + layer.conv.weight[:, 0, di, dj][None, :, None, None] * padded[:, :, di:di + h, dj:dj + w]
    return _silu(conv), z


def reference_scan2d_layer(layer, x, mask):
    """Float64 loops straight from SCANS.md section 1 (rows first, then columns, origin top-left)."""
    b, c, h, w = x.shape
    e, n, r = layer.d_inner, layer.d_state, layer.dt_rank
    u, z = _local_part(layer, x, mask)
    proj = torch.einsum("ke,behw->bkhw", layer.x_proj.weight, u)
    dt = _softplus(torch.einsum("er,brhw->behw", layer.dt_proj.weight, proj[:, :r]) + layer.dt_proj.bias[None, :, None, None])
    dt = dt * mask[:, None]
    Bm, Cm = proj[:, r:r + n], proj[:, r + n:]  # (b, N, H, W)
    A = -torch.exp(layer.A_log)
    y = torch.zeros(b, e, h, w, dtype=x.dtype)
    for bi in range(b):
        G = [[None] * w for _ in range(h)]
        H_ = [[None] * w for _ in range(h)]
        for i in range(h):
            for j in range(w):
                a = torch.exp(dt[bi, :, i, j, None] * A)  # (E, N)
                xin = dt[bi, :, i, j, None] * Bm[bi, None, :, i, j] * u[bi, :, i, j, None]
                G[i][j] = (a * G[i][j - 1] if j > 0 else 0) + xin
                H_[i][j] = (a * H_[i - 1][j] if i > 0 else 0) + G[i][j]
                y[bi, :, i, j] = (H_[i][j] * Cm[bi, None, :, i, j]).sum(-1) + layer.D * u[bi, :, i, j]
    y = y * _silu(z)
    return torch.einsum("ce,behw->bchw", layer.out_proj.weight, y)


def reference_wavefront_layer(layer, x, mask):
    """Float64 loops straight from SCANS.md section 2 (origin top-left)."""
    b, c, h, w = x.shape
    e, n, r = layer.d_inner, layer.d_state, layer.dt_rank
    u, z = _local_part(layer, x, mask)
    proj = torch.einsum("ke,behw->bkhw", layer.x_proj.weight, u)
    rt, rl = proj[:, :r], proj[:, r:2 * r]
    BT, BL, Cm = proj[:, 2 * r:2 * r + n], proj[:, 2 * r + n:2 * r + 2 * n], proj[:, 2 * r + 2 * n:]
    dT = _softplus(torch.einsum("er,brhw->behw", layer.dt_proj_t.weight, rt) + layer.dt_proj_t.bias[None, :, None, None])
    dL = _softplus(torch.einsum("er,brhw->behw", layer.dt_proj_l.weight, rl) + layer.dt_proj_l.bias[None, :, None, None])
    dT, dL = dT * mask[:, None], dL * mask[:, None]
    AT, AL = -torch.exp(layer.AT_log), -torch.exp(layer.AL_log)
    y = torch.zeros(b, e, h, w, dtype=x.dtype)
    for bi in range(b):
        S = [[None] * w for _ in range(h)]
        for i in range(h):
            for j in range(w):
                aT, aL = torch.exp(dT[bi, :, i, j, None] * AT), torch.exp(dL[bi, :, i, j, None] * AL)
                vT = dT[bi, :, i, j, None] * BT[bi, None, :, i, j] * u[bi, :, i, j, None]
                vL = dL[bi, :, i, j, None] * BL[bi, None, :, i, j] * u[bi, :, i, j, None]
                if i == 0:
                    S[i][j] = (aL * S[i][j - 1] if j > 0 else 0) + vL
                elif j == 0:
                    S[i][j] = aT * S[i - 1][j] + vT
                else:
                    S[i][j] = 0.5 * (aL * S[i][j - 1] + vL + aT * S[i - 1][j] + vT)
                y[bi, :, i, j] = (S[i][j] * Cm[bi, None, :, i, j]).sum(-1) + layer.D * u[bi, :, i, j]
    y = y * _silu(z)
    return torch.einsum("ce,behw->bchw", layer.out_proj.weight, y)


REFERENCES = {"scan2d": reference_scan2d_layer, "wavefront2d": reference_wavefront_layer}


def _layer(scan, dim=4, d_inner=6, d_state=3, seed=0, **kw):
    torch.manual_seed(seed)
    layer = TwoDMambaLayer(dim, d_inner, d_state, dt_rank=2, scan=scan, **kw).double()
    with torch.no_grad():  # larger steps than the init so the decays are far from 1 and the test bites
        for p in (layer.dt_proj.bias,) if scan == "scan2d" else (layer.dt_proj_t.bias, layer.dt_proj_l.bias):
            p.uniform_(-1.0, 1.0)
        layer.D.uniform_(0.5, 1.5)
        layer.conv.bias.normal_()
    return layer


@pytest.mark.parametrize("scan", ["scan2d", "wavefront2d"])
@pytest.mark.parametrize("backend", ["kernel", "reference"])
def test_layer_matches_loop_reference_forward_and_backward(scan, backend):
    layer = _layer(scan, backend=backend, checkpoint=False)
    torch.manual_seed(1)
    x = torch.randn(2, 4, 4, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 4, 5) > 0.3
    out = layer(x, mask)
    assert layer.last_backend == backend
    ref = REFERENCES[scan](layer, x, mask)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x] + list(layer.parameters()), g)
    ref_grads = torch.autograd.grad(ref, [x] + list(layer.parameters()), g, allow_unused=True)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, a, b in zip(names, grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=lambda m: f"{scan} grad {name}: {m}")


@pytest.mark.parametrize("scan", ["scan2d", "wavefront2d"])
def test_no_mask_means_every_cell_valid(scan):
    layer = _layer(scan, checkpoint=False)
    x = torch.randn(1, 4, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(layer(x, None), layer(x, torch.ones(1, 3, 4, dtype=torch.bool)), rtol=0, atol=0)


@pytest.mark.parametrize("scan", ["scan2d", "wavefront2d"])
def test_checkpoint_gives_the_same_output_and_gradients(scan):
    layer = _layer(scan)
    x = torch.randn(1, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(1, 5, 6) > 0.4
    res = []
    for ck in (False, True):
        layer.checkpoint = ck
        out = layer(x, mask)
        grads = torch.autograd.grad(out.pow(2).sum(), [x] + list(layer.parameters()))
        res.append((out.detach(), grads))
    torch.testing.assert_close(res[0][0], res[1][0], rtol=0, atol=0)
    for a, b in zip(res[0][1], res[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def _tissue(h, w, seed):
    """A random tissue mask on an h x w bounding box (touches all four borders, has holes)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(h, w, generator=g) > 0.35
    m[0, 1] = m[-1, -2] = m[1, 0] = m[-2, -1] = True
    return m


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scan2d_empty_cells_transparent_under_embedding(seed):
    """Tissue-cropped grid vs the same tissue placed at a random offset in a larger canvas, with
    random features written into every empty cell (holes and border): identical at tissue cells."""
    layer = _layer("scan2d", seed=seed, checkpoint=False)
    g = torch.Generator().manual_seed(100 + seed)
    h, w = 5, 6
    mask = _tissue(h, w, seed)
    x = torch.randn(1, 4, h, w, dtype=torch.float64, generator=g)
    crop_in = torch.where(mask, x, torch.randn(x.shape, dtype=x.dtype, generator=g))
    pt, pb, pl, pr = (int(v) for v in torch.randint(1, 4, (4,), generator=g))
    H, W = h + pt + pb, w + pl + pr
    canvas = torch.randn(1, 4, H, W, dtype=torch.float64, generator=g) * 3
    canvas[:, :, pt:pt + h, pl:pl + w] = torch.where(mask, x, torch.randn(x.shape, dtype=x.dtype, generator=g))
    big_mask = torch.zeros(1, H, W, dtype=torch.bool)
    big_mask[0, pt:pt + h, pl:pl + w] = mask
    out_crop = layer(crop_in, mask[None])
    out_big = layer(canvas, big_mask)[:, :, pt:pt + h, pl:pl + w]
    torch.testing.assert_close(out_big[..., mask], out_crop[..., mask], rtol=1e-12, atol=1e-13)
    # and the tissue really depends on other tissue through the scan (the check is not vacuous)
    x2 = x.clone()
    x2[..., 0, 1] += 1.0
    assert not torch.allclose(layer(torch.where(mask, x2, crop_in), mask[None])[..., -1, -2],
                              out_crop[..., -1, -2])


def test_wavefront_padding_after_the_tissue_is_transparent_before_it_is_not():
    """Mamba2D scan from the top-left: empty cells below/right of the tissue box change nothing and
    hole contents never matter; empty rows above the box turn first-row cells into interior cells
    (weight 1/2 instead of 1), so the model must use the tissue-cropped grid."""
    layer = _layer("wavefront2d", checkpoint=False)
    g = torch.Generator().manual_seed(7)
    h, w = 5, 6
    mask = _tissue(h, w, 3)
    x = torch.randn(1, 4, h, w, dtype=torch.float64, generator=g)
    out = layer(x, mask[None])
    other = torch.where(mask, x, torch.randn(x.shape, dtype=x.dtype, generator=g) * 5)
    torch.testing.assert_close(layer(other, mask[None])[..., mask], out[..., mask], rtol=1e-12, atol=1e-13)
    big = torch.randn(1, 4, h + 2, w + 3, dtype=torch.float64, generator=g)
    big[..., :h, :w] = x
    big_mask = torch.zeros(1, h + 2, w + 3, dtype=torch.bool)
    big_mask[0, :h, :w] = mask
    torch.testing.assert_close(layer(big, big_mask)[..., :h, :w][..., mask], out[..., mask], rtol=1e-12, atol=1e-13)
    top = torch.zeros(1, 4, h + 1, w, dtype=torch.float64)
    top[..., 1:, :] = x
    top_mask = torch.zeros(1, h + 1, w, dtype=torch.bool)
    top_mask[0, 1:] = mask
    shifted = layer(top, top_mask)[..., 1:, :]
    assert not torch.allclose(shifted[..., mask], out[..., mask])


def test_masked_softplus_gradient_from_its_output():
    torch.manual_seed(0)
    v = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True) * 8
    v.retain_grad()
    bias = torch.randn(5, 1, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 1, 7) > 0.5
    out = masked_softplus(v, bias, mask)
    ref = torch.log1p(torch.exp(v + bias)) * mask  # exact softplus: no threshold at 20
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    a = torch.autograd.grad(out, (v, bias), g)
    b = torch.autograd.grad(ref, (v, bias), g)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_parameter_count_and_init():
    layer = TwoDMambaLayer(128, 256, 16)
    r = math.ceil(128 / 16)
    expected = 128 * 512 + (256 * 9 + 256) + 256 * (r + 32) + (r * 256 + 256) + 256 * 16 + 256 + 256 * 128
    assert sum(p.numel() for p in layer.parameters()) == expected
    torch.testing.assert_close(layer.A_log[5], torch.log(torch.arange(1, 17, dtype=torch.float32)))
    dt = F.softplus(layer.dt_proj.bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6
    wf = TwoDMambaLayer(128, 256, 16, scan="wavefront2d")
    assert sum(p.numel() for p in wf.parameters()) == expected - 256 * (r + 32) - (r * 256 + 256) - 256 * 16 + (
        256 * (2 * r + 48) + 2 * (r * 256 + 256) + 2 * 256 * 16)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="scan"):
        TwoDMambaLayer(8, scan="zigzag")
    with pytest.raises(ValueError, match="d_conv"):
        TwoDMambaLayer(8, d_conv=4)
    layer = TwoDMambaLayer(8, 16, 4)
    with pytest.raises(ValueError, match="x must have shape"):
        layer(torch.randn(1, 7, 3, 3))
    with pytest.raises(ValueError, match="mask must have shape"):
        layer(torch.randn(1, 8, 3, 3), torch.ones(1, 3, 4, dtype=torch.bool))


@pytest.mark.gpu
@pytest.mark.parametrize("scan,checkpoint", [("scan2d", False), ("scan2d", True), ("wavefront2d", False)])
def test_cuda_kernel_vs_reference_and_bf16_autocast(scan, checkpoint):
    torch.manual_seed(0)
    layer = TwoDMambaLayer(32, 64, 16, scan=scan, checkpoint=checkpoint).cuda()
    x = torch.randn(2, 32, 20, 23, device="cuda", requires_grad=True)
    mask = torch.rand(2, 20, 23, device="cuda") > 0.4
    outs = {}
    for backend in ("kernel", "reference"):
        layer.backend = backend
        out = layer(x, mask)
        assert layer.last_backend == backend
        grads = torch.autograd.grad(out.square().sum(), [x] + list(layer.parameters()))
        outs[backend] = (out.detach(), grads)
    torch.testing.assert_close(outs["kernel"][0], outs["reference"][0], rtol=1e-4, atol=1e-5)
    for a, b in zip(outs["kernel"][1], outs["reference"][1]):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-4)
    layer.backend = "kernel"
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = layer(x, mask)
    assert out.dtype == torch.bfloat16
    err = (out.float() - outs["kernel"][0]).norm() / outs["kernel"][0].norm()
    assert err < 3e-2, err
    # The gradients under autocast are the float32 ones up to bfloat16 rounding (a dtype slip in a
    # backward reads garbage: finite, and far off).
    # (A gradient near zero is measured against the largest one: bfloat16 leaves rounding noise there.)
    grads = torch.autograd.grad(out.float().square().sum(), [x] + list(layer.parameters()))
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    floor = 1e-3 * max(b.norm() for b in outs["kernel"][1])
    for name, a, b in zip(names, grads, outs["kernel"][1]):
        rel = ((a.float() - b).norm() / torch.maximum(b.norm(), floor)).item()
        assert torch.isfinite(a).all() and rel < 1e-1, (name, rel)


@pytest.mark.parametrize("backend", ["kernel", "reference"])
@pytest.mark.parametrize("chunk", [1, 3, 8, None])
@pytest.mark.parametrize("masked", [True, False])
def test_chunked_scan2d_matches_the_plain_layer(backend, chunk, masked):
    """checkpoint=True runs scan2d over channel chunks (forward and a two-pass backward): same
    output and gradients as the plain graph, in float64, for chunks that do and do not divide E."""
    layer = _layer("scan2d", backend=backend, d_inner=8, chunk_channels=chunk)
    torch.manual_seed(2)
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 5, 6) > 0.4 if masked else None
    g = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    res = []
    for ck in (False, True):
        layer.checkpoint = ck
        out = layer(x, mask)
        res.append((out.detach(), torch.autograd.grad(out, [x] + list(layer.parameters()), g)))
    torch.testing.assert_close(res[1][0], res[0][0], rtol=1e-12, atol=1e-13)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, a, b in zip(names, res[1][1], res[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12, msg=lambda m: f"grad {name}: {m}")


def test_chunked_scan2d_bf16_autocast_on_cpu_matches_the_plain_layer():
    """Under bf16 autocast the chunked path keeps the plain layer's dtypes (bf16 output, float32
    parameter gradients) and agrees with it to bf16 rounding."""
    torch.manual_seed(3)
    layer = TwoDMambaLayer(8, 16, 4, chunk_channels=5)
    x = torch.randn(1, 8, 6, 7, requires_grad=True)
    mask = torch.rand(1, 6, 7) > 0.3
    res = []
    for ck in (False, True):
        layer.checkpoint = ck
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x, mask)
        grads = torch.autograd.grad(out.float().pow(2).sum(), [x] + list(layer.parameters()))
        res.append((out, grads))
    assert res[1][0].dtype == res[0][0].dtype == torch.bfloat16
    # the hand-written accumulations of the backward build no graph (it would keep every chunk alive)
    assert all(g.grad_fn is None and not g.requires_grad for g in res[1][1])
    torch.testing.assert_close(res[1][0].float(), res[0][0].float(), rtol=2e-2, atol=2e-2)
    for a, b in zip(res[1][1], res[0][1]):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2 * b.abs().max().item())


def test_chunk_channels_argument_checked():
    with pytest.raises(ValueError, match="chunk_channels"):
        TwoDMambaLayer(4, 8, chunk_channels=0)


def test_chunked_scan2d_matches_the_loop_reference():
    layer = _layer("scan2d", backend="kernel", checkpoint=True, chunk_channels=4)
    torch.manual_seed(4)
    x = torch.randn(1, 4, 4, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(1, 4, 5) > 0.3
    out = layer(x, mask)
    ref = reference_scan2d_layer(layer, x, mask)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x] + list(layer.parameters()), g)
    ref_grads = torch.autograd.grad(ref, [x] + list(layer.parameters()), g, allow_unused=True)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.gpu
def test_cuda_chunked_scan2d_matches_the_plain_layer_and_saves_memory():
    """On CUDA (kernel backend): the chunked path agrees with the plain graph in float32 and under
    bf16 autocast, and its step peak (forward + backward) is well below the checkpointed plain one."""
    torch.manual_seed(0)
    layer = TwoDMambaLayer(32, 64, 16, checkpoint=False).cuda()
    x = torch.randn(1, 32, 150, 200, device="cuda", requires_grad=True)
    mask = torch.rand(1, 150, 200, device="cuda") > 0.4
    for amp in (False, True):
        res = []
        for mode in ("plain", "chunked"):
            layer.checkpoint, layer.chunk_channels = (False, None) if mode == "plain" else (True, 8)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                out = layer(x, mask)
            grads = torch.autograd.grad(out.float().square().sum(), [x] + list(layer.parameters()))
            res.append((out.float().detach(), grads))
        tol = 3e-2 if amp else 1e-4
        for a, b in zip([res[1][0], *res[1][1]], [res[0][0], *res[0][1]]):
            err = (a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)
            assert err < tol, (amp, err)
    peaks = {}
    for mode in ("checkpoint", "chunked"):
        layer.checkpoint, layer.chunk_channels = True, (8 if mode == "chunked" else 64)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = layer(x, mask)
        out.float().square().sum().backward()
        torch.cuda.synchronize()
        peaks[mode] = torch.cuda.max_memory_allocated() - base
        x.grad = None
        layer.zero_grad(set_to_none=True)
    # chunk_channels=64 = E is one chunk: the whole layer's scan workspace at once
    assert peaks["chunked"] < 0.8 * peaks["checkpoint"], peaks


def test_chunked_scan2d_on_a_sequence_grid_with_a_1x3_conv():
    """MambaMIL's use: a 1 x L grid, (1, 3) conv, no mask; chunked equals plain."""
    layer = _layer("scan2d", d_inner=8, d_conv=(1, 3), chunk_channels=3)
    x = torch.randn(1, 4, 1, 17, dtype=torch.float64, requires_grad=True)
    res = []
    for ck in (False, True):
        layer.checkpoint = ck
        out = layer(x, None)
        res.append((out.detach(), torch.autograd.grad(out.square().sum(), [x] + list(layer.parameters()))))
    for a, b in zip([res[1][0], *res[1][1]], [res[0][0], *res[0][1]]):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


def test_auto_checkpoint_follows_the_plain_layers_saved_bytes():
    from ssm2d_nn.layers.mamba2d import CHECKPOINT_BYTES

    layer = TwoDMambaLayer(8, d_inner=256, d_state=16)
    bf16_bytes, f32_bytes = 256 * (16 * 2 + 4 * 2), 256 * (16 * 4 + 4 * 2)  # activations + carries per cell
    n = CHECKPOINT_BYTES // bf16_bytes  # the largest grid kept plain under bf16 autocast
    grid = lambda w: torch.zeros(1, 1, 1, 1).expand(2, 8, 1, w // 2)  # noqa: E731  (no memory behind it)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.plain_layer_saved_bytes(grid(2 * (n // 2))) == 2 * (n // 2) * bf16_bytes
        assert not layer._use_checkpoint(grid(2 * (n // 2)))
        assert layer._use_checkpoint(grid(2 * (n // 2) + 2))
    assert layer.plain_layer_saved_bytes(grid(2 * (n // 2))) == 2 * (n // 2) * f32_bytes
    assert layer._use_checkpoint(grid(2 * (n // 2)))  # float32 keeps more: the lean path
    with torch.no_grad():
        assert not layer._use_checkpoint(grid(2 * (n // 2) + 2))  # nothing to keep without a backward
    layer.checkpoint = False
    assert not layer._use_checkpoint(grid(4 * n))


@pytest.mark.parametrize("sliced", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
def test_channels_first_linear_against_float64_einsum(batch, sliced):
    """_cf_linear (one mm for a single grid, matmul for a batch) equals the float64 einsum, for a
    contiguous input and for a strided channel slice (as the layer's proj[:, :r]), with gradients;
    under bf16 autocast its output is bf16 and within bf16 rounding."""
    from ssm2d_nn.layers.mamba2d import _cf_linear

    g = torch.Generator().manual_seed(torch.seed() % (1 << 31))
    leaf = torch.randn(batch, 9 if sliced else 6, 37, generator=g, dtype=torch.float64, requires_grad=True)
    x = leaf[:, 2:8] if sliced else leaf
    w = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, generator=g, dtype=torch.float64)
    y = _cf_linear(x, w, bias)
    assert y.shape == (batch, 5, 37) and y.is_contiguous()
    torch.testing.assert_close(y, torch.einsum("mk,bkl->bml", w.detach(), x.detach()) + bias[:, None],
                               rtol=1e-12, atol=1e-12)
    gout = torch.randn(y.shape, generator=g, dtype=torch.float64)
    y.backward(gout)
    torch.testing.assert_close(w.grad, torch.einsum("bml,bkl->mk", gout, x.detach()), rtol=1e-12, atol=1e-12)
    dx = torch.einsum("mk,bml->bkl", w.detach(), gout)
    torch.testing.assert_close(leaf.grad[:, 2:8] if sliced else leaf.grad, dx, rtol=1e-12, atol=1e-12)
    if sliced:
        assert not leaf.grad[:, :2].any() and not leaf.grad[:, 8:].any()
    xf, wf = x.detach().float(), torch.randn(5, 6, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb = _cf_linear(xf, wf)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.double(), torch.einsum("mk,bkl->bml", wf.double(), xf.double()), rtol=3e-2, atol=3e-2)
