"""The MIL models: interface, invariances, pooling semantics, closed-form checks, parameter counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ssm2d_path.bag import Bag, SlideGrid
from ssm2d_path.models import (ABMIL, M2DMIL, MODEL_NAMES, MambaMIL, MaxMIL, MeanMIL, TransMIL, TwoDMambaMIL,
                               build_model, param_groups)
from ssm2d_path.models.transmil import NystromAttention, iterative_pinv
from ssm2d_path.models.mamba import topk_instance_pool

F_DIM = 24
SMALL = {"2dmambamil": dict(dim=16, d_inner=32, d_state=4), "m2dmil": dict(dim=16, d_inner=32, d_state=4),
         "mambamil": dict(dim=16, d_inner=32, d_state=4), "abmil": dict(dim=32, attn_dim=16),
         "transmil": dict(dim=32), "mean": dict(dim=32), "max": dict(dim=32)}


def make_slide(h, w, fill, seed, stride=256, feature_dim=F_DIM, dtype=torch.float32):
    rng = np.random.default_rng(seed)
    mask = rng.random((h, w)) < fill
    mask[0, rng.integers(w)] = mask[-1, rng.integers(w)] = True
    mask[rng.integers(h), 0] = mask[rng.integers(h), -1] = True
    rows, cols = np.nonzero(mask)
    perm = rng.permutation(len(rows))  # files list patches in no particular order
    rows, cols = rows[perm], cols[perm]
    coords = np.stack([cols * stride + 3 * stride, rows * stride + 7 * stride], axis=1)
    feats = torch.from_numpy(rng.standard_normal((len(rows), feature_dim))).to(dtype)
    return SlideGrid.from_coords(f"slide{seed}", feats, coords, stride)


def make_bag(seed=0, dtype=torch.float32):
    return Bag(f"bag{seed}", [make_slide(6, 8, 0.6, seed, dtype=dtype), make_slide(5, 4, 0.7, seed + 1, 512, dtype=dtype)])


def small(name, **kw):
    torch.manual_seed(0)
    return build_model(name, F_DIM, 3, **{**SMALL[name], **kw})


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_backward_shapes_and_finite_gradients(name):
    model = small(name)
    bag = make_bag()
    out = model(bag)
    assert out.logits.shape == (1, 3)
    assert out.scores.shape == (bag.num_patches,)
    torch.nn.functional.cross_entropy(out.logits, torch.tensor([1])).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    if name in ("2dmambamil", "m2dmil", "mambamil"):
        assert model.scan_backend in ("kernel", "reference")
    else:
        assert model.scan_backend is None


def _permuted(slide: SlideGrid, perm: np.ndarray) -> SlideGrid:
    return SlideGrid.from_coords(slide.slide_id, slide.features[perm], slide.coords[perm], slide.stride)


@pytest.mark.parametrize("name", ["2dmambamil", "m2dmil", "mambamil"])
def test_patch_order_does_not_matter_but_layout_does(name):
    model = small(name).eval()
    bag = make_bag(3)
    out = model(bag)
    rng = np.random.default_rng(5)
    perms = [rng.permutation(s.num_patches) for s in bag.slides]
    shuffled = model(Bag(bag.bag_id, [_permuted(s, p) for s, p in zip(bag.slides, perms)]))
    torch.testing.assert_close(shuffled.logits, out.logits, rtol=1e-5, atol=1e-6)
    expected = torch.cat([sc[torch.as_tensor(p)] for sc, p in zip(bag.split(out.scores), perms)])
    torch.testing.assert_close(shuffled.scores, expected, rtol=1e-5, atol=1e-6)
    # same features and same set of occupied cells, but patches moved to other cells: a different slide
    s0 = bag.slides[0]
    moved = SlideGrid.from_coords(s0.slide_id, s0.features, s0.coords[rng.permutation(s0.num_patches)], s0.stride)
    other = model(Bag(bag.bag_id, [moved, bag.slides[1]]))
    assert not torch.allclose(other.logits, out.logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["2dmambamil", "m2dmil"])
def test_empty_cells_contents_change_nothing(name, monkeypatch):
    """Whatever the dense grid holds in empty cells, logits and scores are unchanged: the layer
    masks them and pooling only sees the tissue patches gathered back from the grid."""
    model = small(name).eval()
    bag = make_bag(4)
    ref = model(bag)
    original = SlideGrid.scatter

    def noisy_scatter(self, x, fill=0.0):
        grid = original(self, x, fill)
        noise = torch.randn_like(grid) * 10
        return torch.where(self.mask[None], grid, noise)

    monkeypatch.setattr(SlideGrid, "scatter", noisy_scatter)
    out = model(bag)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.scores, ref.scores, rtol=1e-5, atol=1e-6)


def test_2dmambamil_slide_position_and_stride_do_not_matter():
    model = small("2dmambamil").eval()
    s = make_slide(6, 7, 0.6, 11)
    moved = SlideGrid.from_coords("x", s.features, s.coords * 2 + 10_000, s.stride * 2)
    torch.testing.assert_close(model(Bag("a", [moved])).logits, model(Bag("a", [s])).logits, rtol=0, atol=0)


def test_2dmambamil_cuts_to_a_hand_pipeline():
    """The model's forward equals embed -> per slide [scatter, layer, gather, residual] -> pooling
    assembled by hand from its parts (in float64), so slides are mixed separately."""
    model = small("2dmambamil").double().eval()
    bag = make_bag(6, dtype=torch.float64)
    out = model(bag)
    h = model.embed(bag.features)
    pieces = []
    for slide, hs in zip(bag.slides, bag.split(h)):
        grid = slide.scatter(model.norms[0](hs))[None]
        pieces.append(hs + slide.gather(model.layers[0](grid, slide.mask[None])[0]))
    hn = model.norm(torch.cat(pieces))
    a = model.pool.attention_w(torch.tanh(model.pool.attention_v(hn)) * torch.sigmoid(model.pool.attention_u(hn)))[:, 0]
    logits = model.classifier(torch.softmax(a, 0) @ hn)
    torch.testing.assert_close(out.scores, a)
    torch.testing.assert_close(out.logits[0], logits)


def test_abmil_attention_by_hand():
    model = small("abmil", dropout=0.0).double().eval()
    bag = make_bag(7, dtype=torch.float64)
    out = model(bag)
    x = bag.features.numpy()
    p = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    h = np.maximum(x @ p["embed.0.weight"].T + p["embed.0.bias"], 0)
    v = np.tanh(h @ p["pool.attention_v.weight"].T + p["pool.attention_v.bias"])
    u = 1 / (1 + np.exp(-(h @ p["pool.attention_u.weight"].T + p["pool.attention_u.bias"])))
    a = (v * u) @ p["pool.attention_w.weight"][0] + p["pool.attention_w.bias"][0]
    w = np.exp(a - a.max())
    w /= w.sum()
    logits = (w @ h) @ p["classifier.weight"].T + p["classifier.bias"]
    np.testing.assert_allclose(out.scores.detach().numpy(), a, rtol=1e-10)
    np.testing.assert_allclose(out.logits.detach().numpy()[0], logits, rtol=1e-10)


def test_mean_and_max_pool_instance_logits():
    bag = make_bag(8, dtype=torch.float64)
    for cls, pool in ((MeanMIL, lambda t: t.mean(0)), (MaxMIL, lambda t: t.max(0).values)):
        torch.manual_seed(0)
        model = cls(F_DIM, 3, dim=16).double().eval()
        out = model(bag)
        inst = model.classifier(torch.relu(model.embed[0](bag.features)))
        torch.testing.assert_close(out.logits[0], pool(inst))
        torch.testing.assert_close(out.scores, inst[:, out.logits.argmax()])


def test_iterative_pinv_converges_to_the_pseudo_inverse():
    torch.manual_seed(0)
    x = torch.softmax(torch.randn(12, 12, dtype=torch.float64) * 3, -1)
    torch.testing.assert_close(iterative_pinv(x, 40), torch.linalg.pinv(x), rtol=1e-7, atol=1e-8)


def test_nystrom_attention_is_exact_when_every_token_is_a_landmark():
    """landmarks = sequence length: each landmark is one token, softmax(QK~)pinv(softmax(Q~K~))
    softmax(Q~K) = S S^+ S = S, the exact attention matrix; compare output and CLS row in closed form."""
    torch.manual_seed(0)
    n, dim, heads, dh = 10, 12, 2, 6
    att = NystromAttention(dim, heads=heads, dim_head=dh, num_landmarks=n, pinv_iterations=40, residual=False).double()
    with torch.no_grad():  # Q = K: a diagonally dominant, well-conditioned softmax kernel
        att.to_qkv.weight[heads * dh:2 * heads * dh] = att.to_qkv.weight[:heads * dh]
    x = torch.randn(1, n, dim, dtype=torch.float64)
    out, cls = att(x, return_cls_attention=True)
    q, k, v = (x[0] @ w.T for w in att.to_qkv.weight.chunk(3, 0))
    q, k, v = (t.reshape(n, heads, dh).transpose(0, 1) for t in (q, k, v))
    s = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), -1)  # (heads, n, n)
    exact = att.to_out((s @ v).transpose(0, 1).reshape(n, heads * dh))
    assert torch.linalg.cond(s).max() < 1e3
    torch.testing.assert_close(out[0], exact, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(cls[0], s[:, 0], rtol=1e-9, atol=1e-10)
    # with fewer landmarks it is only an approximation (the check above is not trivially satisfied)
    att.num_landmarks = 5
    assert not torch.allclose(att(x), out, rtol=1e-3, atol=1e-4)


def test_transmil_scores_are_the_cls_attention_over_patches():
    model = small("transmil").eval()
    bag = make_bag(9)
    out = model(bag)
    assert out.scores.shape == (bag.num_patches,)
    assert (out.scores > -1).all() and torch.isfinite(out.scores).all()


def test_param_groups_split():
    model = small("2dmambamil")
    groups = param_groups(model, 1e-5)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = sorted(names[id(p)] for p in groups[0]["params"])
    no_decay = sorted(names[id(p)] for p in groups[1]["params"])
    assert groups[0]["weight_decay"] == 1e-5 and groups[1]["weight_decay"] == 0.0
    assert decay == sorted(["embed.0.weight", "layers.0.in_proj.weight", "layers.0.conv.weight",
                            "layers.0.x_proj.weight", "layers.0.dt_proj.weight", "layers.0.out_proj.weight",
                            "pool.attention_v.weight", "pool.attention_u.weight", "pool.attention_w.weight",
                            "classifier.weight"])
    assert no_decay == sorted(["embed.0.bias", "norms.0.weight", "layers.0.conv.bias", "layers.0.dt_proj.bias",
                               "layers.0.A_log", "layers.0.D", "norm.weight", "norm.bias", "pool.attention_v.bias",
                               "pool.attention_u.bias", "pool.attention_w.bias", "classifier.bias"])
    m2d = {n for n, p in small("m2dmil").named_parameters()}
    m2d_groups = param_groups(small("m2dmil"), 0.1)
    assert len(m2d_groups[1]["params"]) + len(m2d_groups[0]["params"]) == len(m2d)
    tm = small("transmil")
    tm_no = {id(p) for p in param_groups(tm, 0.1)[1]["params"]}
    assert id(tm.cls_token) in tm_no and id(tm.layer1.norm.weight) in tm_no and id(tm.layer1.attn.to_qkv.weight) not in tm_no
    torch.optim.AdamW(param_groups(model, 1e-5), lr=1e-4)  # accepted as is


def test_2dmambamil_parameter_count_published_defaults():
    """dim 128, d_inner 256, d_state 16, one layer, dt_rank ceil(128/16) = 8, 1024-dim features, 4 outputs."""
    model = TwoDMambaMIL(1024, 4)
    c, e, n, r = 128, 256, 16, 8
    embed = 1024 * c + c
    layer = c + (c * 2 * e) + (e * 9 + e) + e * (r + 2 * n) + (r * e + e) + e * n + e + e * c  # RMSNorm .. out_proj
    head = 2 * c + 2 * (c * 128 + 128) + (128 + 1) + (c * 4 + 4)  # LayerNorm, V, U, w, classifier
    assert sum(p.numel() for p in model.parameters()) == embed + layer + head == 283_013


def test_build_model_errors_and_classes():
    assert isinstance(build_model("ABMIL", 8, 2), ABMIL)
    assert isinstance(build_model("m2dmil", 8, 2, dim=16, d_inner=32), M2DMIL)
    assert isinstance(build_model("mambamil", 8, 2, dim=16, d_inner=32), MambaMIL)
    assert isinstance(build_model("transmil", 8, 2, dim=32), TransMIL)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("clam", 8, 2)
    with pytest.raises(ValueError, match="in_dim"):
        build_model("abmil", 0, 2)
    with pytest.raises(TypeError, match="abmil"):
        build_model("abmil", 8, 2, d_state=4)
    with pytest.raises(ValueError, match="in_dim=32"):
        build_model("2dmambamil", 32, 2, dim=16, d_inner=32)(make_bag())


@pytest.mark.gpu
def test_2dmambamil_cuda_kernel_vs_reference_and_bf16():
    torch.manual_seed(0)
    model = TwoDMambaMIL(F_DIM, 3, dim=32, d_inner=64, dropout=0.0).cuda().eval()
    bag = Bag("g", [make_slide(30, 40, 0.6, 1), make_slide(12, 9, 0.7, 2)]).to("cuda")
    res = {}
    for backend in ("kernel", "reference"):
        for layer in model.layers:
            layer.backend = backend
        model.zero_grad()
        out = model(bag)
        assert model.scan_backend == backend
        out.logits.square().sum().backward()
        res[backend] = (out.logits.detach(), out.scores.detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(res["kernel"][0], res["reference"][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(res["kernel"][1], res["reference"][1], rtol=1e-4, atol=1e-5)
    for a, b in zip(res["kernel"][2], res["reference"][2]):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-5)
    for layer in model.layers:
        layer.backend = "kernel"
    model.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(bag)
    rel = (out.logits.float() - res["kernel"][0]).norm() / res["kernel"][0].norm()
    assert rel < 5e-2, rel
    # The gradients under autocast are the float32 ones up to bfloat16 rounding (a dtype slip in a
    # backward reads garbage: finite, and far off).
    # (A gradient that is zero in exact arithmetic, as the attention bias's under the softmax, is
    # measured against the largest one: bfloat16 leaves rounding noise there.)
    out.logits.float().square().sum().backward()
    floor = 1e-3 * max(b.norm() for b in res["kernel"][2])
    for (name, p), b in zip(model.named_parameters(), res["kernel"][2]):
        rel = ((p.grad.float() - b).norm() / torch.maximum(b.norm(), floor)).item()
        assert torch.isfinite(p.grad).all() and rel < 1e-1, (name, rel)


def test_relu_dropout_equals_relu_then_dropout_with_the_same_mask():
    from ssm2d_path.models.common import relu_dropout

    torch.manual_seed(5)
    v = torch.randn(40, 9, dtype=torch.float64, requires_grad=True)
    keep = torch.rand(40, 9) > 0.25
    g = torch.randn(40, 9, dtype=torch.float64)
    out = relu_dropout(v, 0.25, True, keep)
    ref = torch.relu(v) * keep / 0.75
    torch.testing.assert_close(out, ref, rtol=1e-15, atol=0)
    torch.testing.assert_close(torch.autograd.grad(out, v, g)[0], torch.autograd.grad(ref, v, g)[0], rtol=1e-15, atol=0)
    # eval / p = 0: plain ReLU, gradient included
    for args in ((0.25, False), (0.0, True)):
        out = relu_dropout(v, *args)
        torch.testing.assert_close(out, torch.relu(v), rtol=0, atol=0)
        torch.testing.assert_close(torch.autograd.grad(out, v, g)[0], g * (v > 0), rtol=0, atol=0)


def test_relu_dropout_draws_a_bernoulli_mask_with_the_dropout_scale():
    from ssm2d_path.models.common import relu_dropout

    v = torch.rand(200, 100, dtype=torch.float64) + 0.1  # all positive: zeros are the dropped cells
    out = relu_dropout(v, 0.25, True)
    dropped = (out == 0).double().mean().item()
    assert 0.22 < dropped < 0.28
    kept = out != 0
    torch.testing.assert_close(out[kept], v[kept] / 0.75, rtol=1e-15, atol=0)


def test_ssm_mil_embedding_and_training_forward_match_the_modules():
    """embed_patches (fused ReLU+dropout, plain-dtype Linear) equals the Sequential in eval, and a
    training forward with dropout 0 equals the eval forward (nothing else depends on the mode)."""
    from ssm2d_path.models.common import embed_patches

    model = small("2dmambamil").double()
    bag = make_bag(3, dtype=torch.float64)
    model.eval()
    torch.testing.assert_close(embed_patches(model.embed, bag.features), model.embed(bag.features), rtol=0, atol=0)
    model0 = small("2dmambamil", dropout=0.0).double()
    ev = model0.eval()(bag)
    tr = model0.train()(bag)
    torch.testing.assert_close(tr.logits, ev.logits, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("bias", [True, False])
def test_recast_linear_matches_a_float64_reference_and_saves_no_copy_of_x(bias):
    """_RecastLinear: autocast's bf16 linear (inputs rounded to bf16, float32 accumulation) forward
    and backward against float64 on the rounded inputs; between forward and backward it keeps x
    itself (no N x in_dim bf16 copy) and the small bf16 weight."""
    from ssm2d_path.models.common import _RecastLinear

    g = torch.Generator().manual_seed(11)
    x = torch.randn(300, 64, generator=g).requires_grad_(True)
    w = (torch.randn(24, 64, generator=g) / 8).requires_grad_(True)
    b = torch.randn(24, generator=g).requires_grad_(True) if bias else None
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = _RecastLinear.apply(x, w, b, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert any(t.data_ptr() == x.data_ptr() for t in saved)
    assert sum(t.numel() * t.element_size() for t in saved if t.data_ptr() != x.data_ptr()) <= w.numel() * 2
    grad = torch.randn(out.shape, generator=g).to(torch.bfloat16)
    out.backward(grad)
    r = lambda t: t.detach().to(torch.bfloat16).double()  # noqa: E731
    ref = r(x) @ r(w).t() + (r(b) if bias else 0)
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)
    gd = grad.double()
    torch.testing.assert_close(x.grad.double(), gd @ r(w), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(w.grad.double(), gd.t() @ r(x), rtol=2e-2, atol=5e-2)
    assert w.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    if bias:
        torch.testing.assert_close(b.grad.double(), gd.sum(0), rtol=1e-5, atol=1e-4)


def test_scatter_and_gather_by_hand():
    s = make_slide(5, 7, 0.6, 4)
    x = torch.randn(s.num_patches, 3)
    grid = s.scatter(x, fill=-1.0)
    h, w = s.shape
    ref = torch.full((3, h, w), -1.0)
    for i, (r, c) in enumerate(zip(s.index_tensor(0).tolist(), s.index_tensor(1).tolist())):
        ref[:, r, c] = x[i]
    torch.testing.assert_close(grid, ref, rtol=0, atol=0)
    torch.testing.assert_close(s.gather(grid), x, rtol=0, atol=0)


def _index_reference(s):
    """mask and flat index from the slide's numpy rows/cols by a Python loop (not the grid's code)."""
    h, w = s.shape
    mask = torch.zeros(h, w, dtype=torch.bool)
    flat = []
    for r, c in zip(s.rows.tolist(), s.cols.tolist()):
        mask[r, c] = True
        flat.append(r * w + c)
    return mask, torch.tensor(flat, dtype=torch.long)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_grid_index_tensors_are_made_once_per_device_and_right(device):
    from dataclasses import replace

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    s = make_slide(7, 11, 0.55, 5).to(device)
    mask_ref, flat_ref = _index_reference(s)
    assert s.mask.device.type == device and s.flat_index().device.type == device
    torch.testing.assert_close(s.mask.cpu(), mask_ref, rtol=0, atol=0)
    torch.testing.assert_close(s.flat_index().cpu(), flat_ref, rtol=0, atol=0)
    torch.testing.assert_close(s.index_tensor(0).cpu(), torch.from_numpy(s.rows.astype(np.int64)), rtol=0, atol=0)
    torch.testing.assert_close(s.index_tensor(1).cpu(), torch.from_numpy(s.cols.astype(np.int64)), rtol=0, atol=0)
    # made once: the same tensors on every call (no copy to the device per layer)
    assert s.mask is s.mask and s.flat_index() is s.flat_index() and s.index_tensor(1) is s.index_tensor(1)
    # another grid (other cells) starts with its own: nothing of the first one's is reused
    t = replace(s, rows=s.rows[::-1].copy(), cols=s.cols[::-1].copy())
    assert t.flat_index() is not s.flat_index()
    torch.testing.assert_close(t.flat_index().cpu(), flat_ref.flip(0), rtol=0, atol=0)
    moved = s.to("cpu")
    torch.testing.assert_close(moved.mask, mask_ref, rtol=0, atol=0)
    # raster order: row by row, left to right, by sorting (row, col) pairs in Python; inverse undoes it
    order, inverse = s.raster_order()
    pairs = list(zip(s.rows.tolist(), s.cols.tolist()))
    assert order.device.type == device and order.cpu().tolist() == sorted(range(len(pairs)), key=lambda i: pairs[i])
    x = torch.randn(len(pairs), 3, device=device)
    torch.testing.assert_close(x[order][inverse], x, rtol=0, atol=0)
    assert s.raster_order()[0] is order


def test_gather_gradient_lands_on_the_patch_cells_only():
    # d/dgrid of sum(w * gather(grid)) is w at each patch's cell and 0 on empty cells, by hand.
    s = make_slide(6, 9, 0.5, 2)
    h, w = s.shape
    grid = torch.randn(4, h, w, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(s.num_patches, 4, dtype=torch.float64)
    (s.gather(grid) * weight).sum().backward()
    ref = torch.zeros(4, h, w, dtype=torch.float64)
    for i, (r, c) in enumerate(zip(s.index_tensor(0).tolist(), s.index_tensor(1).tolist())):
        ref[:, r, c] += weight[i]
    torch.testing.assert_close(grid.grad, ref, rtol=0, atol=0)


def test_rms_norm_lowp_matches_nn_rmsnorm():
    from ssm2d_path.models.mamba import _RMSNormLowp

    torch.manual_seed(6)
    norm = torch.nn.RMSNorm(7, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    h = torch.randn(30, 7, dtype=torch.float64, requires_grad=True) * 3
    g = torch.randn(30, 7, dtype=torch.float64)
    out = _RMSNormLowp.apply(h, norm.weight, 1e-5, torch.float64)
    ref = norm(h)
    torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-14)
    for a, b in zip(torch.autograd.grad(out, [h, norm.weight], g), torch.autograd.grad(ref, [h, norm.weight], g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    low = _RMSNormLowp.apply(h.float(), norm.weight.float(), 1e-5, torch.bfloat16)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.double(), ref, rtol=1e-2, atol=1e-2)


def test_2dmambamil_bf16_autocast_training_step_matches_float32():
    """A bf16-autocast forward/backward of the whole model (fused embedding, low-precision norm,
    chunked layer) agrees with the float32 one to bf16 rounding."""
    model = small("2dmambamil", dropout=0.0, checkpoint=True)
    for layer in model.layers:
        layer.chunk_channels = 8
    bag = make_bag(2)
    res = []
    for amp in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = model(bag)
        grads = torch.autograd.grad(out.logits.float().sum(), list(model.parameters()))
        res.append((out.logits.float(), grads))
    torch.testing.assert_close(res[1][0], res[0][0], rtol=5e-2, atol=5e-2)
    for a, b in zip(res[1][1], res[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-1, atol=5e-2 * b.abs().max().item() + 1e-3)


def _conv_by_hand(grid: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """'same' 2D convolution (cross-correlation, zero padding) of a (C, H, W) grid by explicit loops."""
    c_out, c_in, k, _ = weight.shape
    _, h, w = grid.shape
    p = k // 2
    padded = np.zeros((c_in, h + 2 * p, w + 2 * p))
    padded[:, p:p + h, p:p + w] = grid
    out = np.empty((c_out, h, w))
    for r in range(h):
        for c in range(w):
            window = padded[:, r:r + k, c:c + k]
            out[:, r, c] = np.tensordot(weight, window, axes=([1, 2, 3], [0, 1, 2])) + bias
    return out


@pytest.mark.parametrize("local_mix", [1, 3])
def test_2dmambamil_options_match_a_hand_pipeline(local_mix):
    """input_norm, local_mix and top-k pooling: the forward equals the pipeline assembled by hand
    (LayerNorm by formula, the convolution by loops over each slide's own grid, top-k by sorting)."""
    model = small("2dmambamil", input_norm=True, local_mix=local_mix, pool="topk", pool_k=3).double().eval()
    bag = make_bag(8, dtype=torch.float64)
    out = model(bag)
    x = bag.features.numpy()
    xn = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + 1e-5)
    h = model.embed(torch.from_numpy(xn))
    w, b = model.local.weight.detach().numpy(), model.local.bias.detach().numpy()
    pieces = []
    for slide, hs in zip(bag.slides, bag.split(h)):
        grid = np.zeros((hs.shape[1],) + slide.shape)
        grid[:, slide.rows, slide.cols] = hs.detach().numpy().T
        conv = _conv_by_hand(grid, w, b)[:, slide.rows, slide.cols].T
        hs = hs + torch.relu(torch.from_numpy(conv))
        g = slide.scatter(model.norms[0](hs))[None]
        pieces.append(hs + slide.gather(model.layers[0](g, slide.mask[None])[0]))
    patch = model.classifier(model.norm(torch.cat(pieces))).detach().numpy()
    want = np.sort(patch, axis=0)[-3:].mean(0)
    np.testing.assert_allclose(out.logits[0].detach().numpy(), want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out.scores.detach().numpy(), patch[:, int(np.argmax(want))], rtol=1e-10, atol=1e-12)


def test_2dmambamil_local_mix_sees_the_layout_and_not_the_patch_order():
    """With local_mix the model still ignores the order of the patches in the file, but a pair of
    cells moved apart changes the output (the convolution reads neighbours)."""
    model = small("2dmambamil", local_mix=3, pool="topk").double().eval()
    s = make_slide(6, 7, 0.6, 12, dtype=torch.float64)
    perm = np.random.default_rng(3).permutation(s.num_patches)
    torch.testing.assert_close(model(Bag("a", [_permuted(s, perm)])).logits, model(Bag("a", [s])).logits)
    swapped = s.features.clone()
    swapped[[0, 1]] = swapped[[1, 0]]  # same multiset of features, two cells exchanged
    moved = SlideGrid.from_coords("m", swapped, s.coords, s.stride)
    assert not torch.allclose(model(Bag("a", [moved])).logits, model(Bag("a", [s])).logits)


def test_topk_instance_pool_by_hand():
    rng = np.random.default_rng(5)
    logits = torch.from_numpy(rng.standard_normal((7, 3)))
    for k in (1, 2, 7, 20):
        out = topk_instance_pool(logits, k)
        kk = min(k, 7)
        want = np.array([sorted(logits[:, j].tolist())[-kk:] for j in range(3)]).mean(1)
        np.testing.assert_allclose(out.logits[0].numpy(), want)
        np.testing.assert_array_equal(out.scores.numpy(), logits[:, int(np.argmax(want))].numpy())
    with pytest.raises(ValueError, match="k"):
        topk_instance_pool(logits, 0)


def test_2dmambamil_options_default_to_the_published_model():
    """Without options the model holds exactly the published modules (no input norm, no convolution,
    gated attention) and the same parameters as before the options existed."""
    model = TwoDMambaMIL(1024, 4)
    assert model.input_norm is None and model.local is None and model.pool is not None
    assert sum(p.numel() for p in model.parameters()) == 283_013
    opt = TwoDMambaMIL(1024, 4, input_norm=True, local_mix=3, pool="topk")
    head = 2 * (128 * 128 + 128) + (128 + 1)  # the gated attention (V, U, w) it leaves out
    assert sum(p.numel() for p in opt.parameters()) == 283_013 - head + 128 * 128 * 9 + 128


@pytest.mark.parametrize("kwargs, match", [
    (dict(local_mix=2), "local_mix"), (dict(local_mix=-1), "local_mix"), (dict(local_mix=True), "local_mix"),
    (dict(pool="mean"), "pool"), (dict(pool_k=0), "pool_k"), (dict(input_norm="yes"), "input_norm")])
def test_2dmambamil_bad_options_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TwoDMambaMIL(8, 2, dim=16, d_inner=32, **kwargs)


def test_mambamil_refuses_local_mix():
    with pytest.raises(ValueError, match="local_mix"):
        MambaMIL(8, 2, dim=16, d_inner=32, local_mix=3)
