"""M2D layers: the mixer against a hand-composed float64 reference, kernel against reference backend,
the scan origin, StarReLU, and the 2D RoPE attention against its closed form."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ssm2d_nn.layers import M2DMixer, RoPEAttention2d, StarReLU
from ssm2d_nn.layers.m2d import apply_rope, axial_rope_cos_sin
from ssm2d_nn.ops import wavefront2d_reference


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def _randomize(module, seed):
    """Random parameters (not the init values) so every path of the mixer matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("AT_log", "AL_log")):
                p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) * 1.5 - 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.4)
    return module


def _mixer(dim=24, origin="tl", backend="reference", local_path=True, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    m = M2DMixer(dim, d_state=16, origin=origin, backend=backend, local_path=local_path).to(dtype)
    return _randomize(m, seed)


def _hand_mixer(m: M2DMixer, x: torch.Tensor) -> torch.Tensor:
    """The released formulas written out (separate dt projections, explicit flips for "br",
    StarReLU by its formula, NCHW conv), on the float64 scan reference."""
    r, n = m.dt_rank, m.d_state
    flip = m.origin == "br"
    xs = x.flip(1, 2) if flip else x
    u = F.gelu(xs @ m.in_proj.weight.T + m.in_proj.bias)
    xdbl = u @ m.x_proj.weight.T
    rT, rL, bt, bl, c = torch.split(xdbl, [r, r, n, n, n], dim=-1)
    dT = F.softplus(rT @ m.dt_projT.weight.T + m.dt_projT.bias)
    dL = F.softplus(rL @ m.dt_projL.weight.T + m.dt_projL.bias)
    y = wavefront2d_reference(u, dT, dL, -torch.exp(m.AT_log), -torch.exp(m.AL_log), bt.contiguous(),
                              bl.contiguous(), c.contiguous(), m.D, origin="tl")
    out = F.gelu(y) @ m.out_proj.weight.T + m.out_proj.bias
    if flip:
        out = out.flip(1, 2)
    if m.local_path is None:
        return out
    lp = m.local_path
    star = lambda t, a: a.scale * torch.relu(t) ** 2 + a.bias  # noqa: E731
    z = F.layer_norm(x, (x.shape[-1],), m.local_norm.weight, m.local_norm.bias)
    z = star(z @ lp.pwconv1.weight.T, lp.act1)
    z = F.conv2d(z.permute(0, 3, 1, 2).contiguous(), lp.dwconv.weight, padding=1, groups=z.shape[-1])
    z = star(z.permute(0, 2, 3, 1), lp.act2) @ lp.pwconv2.weight.T
    return out + z


@pytest.mark.parametrize("origin", ["tl", "br"])
def test_mixer_matches_hand_composition_float64(origin):
    m = _mixer(origin=origin, backend="reference", seed=1)
    x = torch.randn(2, 5, 7, 24, dtype=torch.float64)
    assert rel_err(m(x), _hand_mixer(m, x)) < 1e-12


@pytest.mark.parametrize("origin", ["tl", "br"])
def test_mixer_kernel_backend_matches_reference_forward_and_gradients(origin):
    mk = _mixer(origin=origin, backend="kernel", seed=2)
    mr = _mixer(origin=origin, backend="reference", seed=2)
    mr.load_state_dict(mk.state_dict())
    x = torch.randn(2, 6, 5, 24, dtype=torch.float64, requires_grad=True)
    yk, yr = mk(x), mr(x)
    assert rel_err(yk, yr) < 1e-11
    gout = torch.randn_like(yr)
    gk = torch.autograd.grad(yk, [x, *mk.parameters()], gout)
    gr = torch.autograd.grad(yr, [x, *mr.parameters()], gout)
    names = ["x"] + [n for n, _ in mk.named_parameters()]
    for name, a, b in zip(names, gk, gr):
        assert rel_err(a, b) < 1e-9, name


def test_mixer_float32_kernel_close_to_float64_reference():
    mr = _mixer(backend="reference", seed=3)
    mk = _mixer(backend="kernel", dtype=torch.float32, seed=3)
    mk.load_state_dict({k: v.float() for k, v in mr.state_dict().items()})
    x = torch.randn(1, 8, 9, 24, dtype=torch.float64)
    assert rel_err(mk(x.float()), mr(x)) < 1e-5


def test_origin_br_is_tl_on_the_flipped_grid():
    # SSM path only: the local 3x3 conv is not flip-symmetric, the scan must be.
    br = _mixer(origin="br", backend="kernel", local_path=False, seed=4)
    tl = _mixer(origin="tl", backend="reference", local_path=False, seed=4)
    tl.load_state_dict(br.state_dict())
    x = torch.randn(2, 6, 4, 24, dtype=torch.float64)
    assert rel_err(br(x), tl(x.flip(1, 2)).flip(1, 2)) < 1e-11
    assert rel_err(br(x), tl(x)) > 1e-3  # the origin does matter


def test_mixer_init_and_parameter_count():
    m = M2DMixer(64)  # the M2D-T stage-1 mixer (ANCHORS.md)
    counts = {n: sum(p.numel() for p in c.parameters()) for n, c in m.named_children()}
    assert counts == {"local_norm": 128, "local_path": 17540, "in_proj": 4160, "x_proj": 3584, "dt_projT": 320,
                      "dt_projL": 320, "out_proj": 4160}
    assert m.AT_log.numel() + m.AL_log.numel() == 2048 and m.D.numel() == 64 and m.dt_rank == 4
    assert torch.equal(m.AT_log[5], torch.arange(1, 17, dtype=torch.float32).log())
    assert torch.equal(m.AL_log, m.AT_log) and torch.all(m.D == 1)
    dt = F.softplus(m.dt_projT.bias)
    assert dt.min() >= 1e-4 * 0.999 and dt.max() <= 0.1 * 1.001
    assert m.x_proj.bias is None and m.local_path.dwconv.bias is None


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="origin"):
        M2DMixer(16, origin="tr")
    with pytest.raises(ValueError, match="backend"):
        M2DMixer(16, backend="cuda")
    with pytest.raises(ValueError, match=r"\(batch, H, W, 16\)"):
        M2DMixer(16)(torch.randn(1, 16, 4, 4))
    with pytest.raises(ValueError, match="head_dim"):
        RoPEAttention2d(64, head_dim=30)


def test_star_relu_formula():
    act = StarReLU().double()
    with torch.no_grad():
        act.scale.fill_(0.7)
        act.bias.fill_(-0.3)
    x = torch.randn(100, dtype=torch.float64)
    expect = torch.tensor([0.7 * max(v, 0.0) ** 2 - 0.3 for v in x.tolist()], dtype=torch.float64)
    assert torch.allclose(act(x), expect, rtol=0, atol=1e-14)
    assert [p.numel() for p in StarReLU().parameters()] == [1, 1]


# --- 2D RoPE ---------------------------------------------------------------------------------------

def test_rope_tables_closed_form():
    H, W, hd, base = 3, 5, 32, 10000.0
    cos, sin = axial_rope_cos_sin(H, W, hd, base, dtype=torch.float64)
    for i in range(H):
        for j in range(W):
            for c in range(hd):
                pos, k = (i, (c // 2)) if c < hd // 2 else (j, (c - hd // 2) // 2)
                ang = pos * base ** (-k / (hd // 4))
                assert math.isclose(cos[i * W + j, c].item(), math.cos(ang), abs_tol=1e-13)
                assert math.isclose(sin[i * W + j, c].item(), math.sin(ang), abs_tol=1e-13)


def test_rope_rotation_preserves_pair_norms_and_is_relative():
    H, W, hd = 7, 9, 32
    cos, sin = axial_rope_cos_sin(H, W, hd, dtype=torch.float64)
    x = torch.randn(H * W, hd, dtype=torch.float64)
    rx = apply_rope(x, cos, sin)
    pair = lambda t: t.view(H * W, hd // 2, 2).norm(dim=-1)  # noqa: E731
    assert torch.allclose(pair(rx), pair(x), atol=1e-12)
    q, k = torch.randn(hd, dtype=torch.float64), torch.randn(hd, dtype=torch.float64)

    def score(p1, p2):
        a, b = p1[0] * W + p1[1], p2[0] * W + p2[1]
        return (apply_rope(q, cos[a], sin[a]) * apply_rope(k, cos[b], sin[b])).sum().item()

    # q.k depends only on the offset between the two cells
    assert math.isclose(score((1, 2), (3, 0)), score((4, 6), (6, 4)), rel_tol=1e-10, abs_tol=1e-12)
    assert math.isclose(score((0, 0), (2, 5)), score((3, 3), (5, 8)), rel_tol=1e-10, abs_tol=1e-12)
    assert not math.isclose(score((0, 0), (2, 5)), score((0, 0), (5, 2)), rel_tol=1e-3)
    c32, s32 = axial_rope_cos_sin(H, W, hd)  # float32 tables, as released
    assert c32.dtype == torch.float32 and torch.allclose(c32.double(), cos, atol=1e-6)


def _hand_attention(m: RoPEAttention2d, x):
    """Complex-number RoPE, explicit softmax attention, float64."""
    b, H, W, _ = x.shape
    nh, hd = m.num_heads, m.head_dim
    qkv = (x @ m.qkv.weight.T).reshape(b, H * W, 3, nh, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    i = torch.arange(H).repeat_interleave(W).double()
    j = torch.arange(W).repeat(H).double()
    freqs = m.rope_base ** (-torch.arange(hd // 4).double() / (hd // 4))
    ang = torch.cat([i[:, None] * freqs, j[:, None] * freqs], -1)  # (L, hd/2): one angle per pair
    rot = torch.polar(torch.ones_like(ang), ang)[None, :, None]

    def rope(t):
        return torch.view_as_real(torch.view_as_complex(t.reshape(*t.shape[:-1], hd // 2, 2).contiguous()) * rot
                                  ).flatten(-2)

    q = F.layer_norm(rope(q), (hd,), m.q_norm.weight, m.q_norm.bias).transpose(1, 2)
    k = F.layer_norm(rope(k), (hd,), m.k_norm.weight, m.k_norm.bias).transpose(1, 2)
    attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
    out = (attn @ v.transpose(1, 2)).transpose(1, 2).reshape(b, H, W, nh * hd)
    return out @ m.proj.weight.T


@pytest.mark.parametrize("hw", [(4, 6), (5, 3)])
def test_rope_attention_matches_hand_reference(hw):
    torch.manual_seed(5)
    m = _randomize(RoPEAttention2d(96).double(), 5)
    assert m.num_heads == 3 and m.qkv.bias is None and m.proj.bias is None
    x = torch.randn(2, *hw, 96, dtype=torch.float64)
    assert rel_err(m(x), _hand_attention(m, x)) < 1e-12
    assert len(m._rope_cache) == 1  # cached per grid size


def test_rope_attention_any_grid_and_gradients():
    m = RoPEAttention2d(64)
    for hw in [(1, 1), (3, 7), (8, 8)]:
        x = torch.randn(1, *hw, 64, requires_grad=True)
        m(x).sum().backward()
        assert torch.isfinite(x.grad).all()
    assert sum(p.numel() for p in RoPEAttention2d(160).parameters()) == 102528  # M2D-N stage-3 attention


def test_star_relu_keeps_dtype_and_gradients():
    act = StarReLU()
    x = torch.randn(50, dtype=torch.bfloat16, requires_grad=True)
    y = act(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert act.scale.grad.item() == pytest.approx(torch.relu(x.detach().float()).square().sum().item(), rel=1e-2)
    assert act.bias.grad.item() == 50


def test_star_relu_op_on_the_cpu_is_the_formula_and_refuses_the_kernel_by_name():
    from ssm2d_nn import BackendUnavailableError
    from ssm2d_nn.ops import star_relu

    x = torch.randn(4, 5, 6, dtype=torch.float64, requires_grad=True)
    s = torch.tensor([0.7], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    y = star_relu(x, s, b)
    assert torch.allclose(y, 0.7 * torch.relu(x) ** 2 + 0.3, rtol=0, atol=1e-15)
    gx, = torch.autograd.grad(y.sum(), [x])
    assert torch.allclose(gx, 1.4 * torch.relu(x), rtol=0, atol=1e-15)
    with pytest.raises(BackendUnavailableError, match="CUDA only"):
        star_relu(x, s, b, backend="kernel")
    with pytest.raises(ValueError, match="one element each"):
        star_relu(x, torch.ones(2), b)
