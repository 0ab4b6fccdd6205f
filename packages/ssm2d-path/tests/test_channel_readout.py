"""2DMambaMIL's per-channel bag read-out (pool="channels"): pool_channels, channel_readout, the model option."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _cooc_ref import cooc_reference, random_slide  # noqa: E402

from ssm2d_path.bag import Bag, SlideGrid
from ssm2d_path.models import M2DMIL, MambaMIL, TwoDMambaMIL
from ssm2d_path.models.mamba import pool_channels


def _pool_reference(u, how, k=1, tau=1.0):
    """Per channel, by plain Python: mean of the k largest values, or log(mean exp(tau u)) / tau."""
    u = np.asarray(u, dtype=np.float64)
    out = []
    for c in range(u.shape[1]):
        col = sorted((float(v) for v in u[:, c]), reverse=True)
        if how == "topk":
            top = col[:k]
            out.append(sum(top) / len(top))
        else:
            m = col[0]
            out.append((tau * m + math.log(sum(math.exp(tau * (v - m)) for v in col) / len(col))) / tau)
    return np.array(out)


def _readout_reference(u, weight, bias, how, k=1, tau=1.0):
    pooled = _pool_reference(u, how, k, tau)
    logits = np.asarray(weight, dtype=np.float64) @ pooled + np.asarray(bias, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)[int(np.argmax(logits))]
    return logits, np.asarray(u, dtype=np.float64) @ w


@pytest.mark.parametrize("how,k,tau", [("topk", 1, 1.0), ("topk", 3, 1.0), ("topk", 50, 1.0),
                                       ("lme", 1, 0.5), ("lme", 1, 4.0), ("lme", 1, 40.0)])
def test_pool_channels_matches_the_loop_reference(how, k, tau):
    u = torch.from_numpy(np.random.default_rng(k + int(tau)).normal(size=(23, 5)) * 3)
    got = pool_channels(u, how, k, tau)
    assert got.shape == (5,) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), _pool_reference(u.numpy(), how, k, tau), rtol=1e-12, atol=1e-12)


def test_pool_channels_limits():
    u = torch.randn(40, 3, dtype=torch.float64)
    torch.testing.assert_close(pool_channels(u, "topk", 1), u.max(0).values)
    torch.testing.assert_close(pool_channels(u, "topk", 40), u.mean(0))
    torch.testing.assert_close(pool_channels(u, "lme", tau=1e-6), u.mean(0), rtol=0, atol=1e-5)
    assert torch.all((pool_channels(u, "lme", tau=1e3) - u.max(0).values).abs() < 1e-2)
    assert pool_channels(u.float(), "lme", tau=1e3).isfinite().all()  # no overflow in float32


def test_pool_channels_fails_loudly():
    u = torch.randn(5, 2)
    for kwargs, name in (({"how": "max"}, "how:"), ({"how": "topk", "k": 0}, "k:"), ({"how": "topk", "k": 1.5}, "k:"),
                         ({"how": "lme", "tau": 0.0}, "tau:"), ({"how": "lme", "tau": float("inf")}, "tau:")):
        with pytest.raises(ValueError, match=name):
            pool_channels(u, **kwargs)
    with pytest.raises(ValueError, match="u:"):
        pool_channels(u[:, 0], "topk")
    with pytest.raises(ValueError, match="u:"):
        pool_channels(u[:0], "topk")


def _randomise_classifier(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.classifier.weight.copy_(torch.randn(model.classifier.weight.shape, generator=g, dtype=torch.float64))
        model.classifier.bias.copy_(torch.randn(model.classifier.bias.shape, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("how,k,tau", [("topk", 3, None), ("lme", 3, 2.0)])
def test_input_channels_readout_equals_the_loop_reference(how, k, tau):
    """source "input" with input_ica and input_cooc: the pooled [z, co-occurrences of z] of a two-slide
    bag (pooled over both slides' patches) through the classifier, computed by loops in float64."""
    torch.manual_seed(0)
    extra = {"pool_tau": tau} if tau is not None else {}
    model = TwoDMambaMIL(6, 2, dim=8, d_inner=16, d_state=4, input_ica=2, input_cooc="min", pool="channels",
                         channel_source="input", channel_pool=how, pool_k=k, **extra).double().eval()
    model.fit_input_transform(torch.randn(500, 6, dtype=torch.float64), seed=1)
    assert model.classifier.in_features == 2 + 4
    assert torch.all(model.classifier.weight == 0) and torch.all(model.classifier.bias == 0)
    _randomise_classifier(model)
    slides = [random_slide(20, dim=6), random_slide(21, dim=6, shape=(4, 9))]
    u = []
    for s in slides:
        z = ((s.features - model.ica_mean) @ model.ica_unmix).numpy()
        u.append(np.concatenate([z, cooc_reference(s.coords, s.stride, z)], 1))
    u = np.concatenate(u)
    out = model(Bag("a", slides))
    logits, scores = _readout_reference(u, model.classifier.weight.detach(), model.classifier.bias.detach(),
                                        how, k, tau or 1.0)
    np.testing.assert_allclose(out.logits.detach().numpy()[0], logits, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(out.scores.detach().numpy(), scores, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cls", [TwoDMambaMIL, M2DMIL, MambaMIL])
@pytest.mark.parametrize("source", ["hidden", "both"])
def test_hidden_channels_are_the_published_models_residual_stream(cls, source):
    """source "hidden" reads h, the residual stream that the attention-pooled model (same weights)
    normalises and pools: the attention model's output recomputed from h equals its forward; the read-out
    on [x, h] or h equals the loop reference."""
    torch.manual_seed(2)
    kw = dict(dim=8, d_inner=16, d_state=4)
    model = cls(5, 3, **kw, pool="channels", channel_source=source, pool_k=2).double().eval()
    _randomise_classifier(model, 3)
    published = cls(5, 3, **kw).double().eval()
    published.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("classifier")},
                              strict=False)
    bag = Bag("b", [random_slide(40, dim=5), random_slide(41, dim=5, shape=(6, 4))])
    x = model._model_input(bag)
    h = model._hidden(bag, x)
    scores, pooled = published.pool(published.norm(h))
    want = published(bag)
    torch.testing.assert_close(published.classifier(pooled)[None], want.logits)
    torch.testing.assert_close(scores, want.scores)
    u = torch.cat([x, h], 1) if source == "both" else h
    assert model.classifier.in_features == u.shape[1]
    out = model(bag)
    logits, ref_scores = _readout_reference(u.detach().numpy(), model.classifier.weight.detach(),
                                            model.classifier.bias.detach(), "topk", 2)
    np.testing.assert_allclose(out.logits.detach().numpy()[0], logits, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(out.scores.detach().numpy(), ref_scores, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cls", [TwoDMambaMIL, M2DMIL, MambaMIL])
def test_ssm_input_features_reads_the_features_in_the_ssm_and_the_components_in_the_readout(cls):
    """ssm_input="features": the hidden channels are the residual stream of the published model (same
    SSM weights) on the raw features; the input channels are the ICA components and their
    co-occurrences (loop reference); the read-out on [input, hidden] equals the loop reference."""
    torch.manual_seed(5)
    kw = dict(dim=8, d_inner=16, d_state=4)
    model = cls(5, 2, **kw, pool="channels", channel_source="both", pool_k=2, input_ica=2, input_cooc="min",
                ssm_input="features").double().eval()
    _randomise_classifier(model, 2)
    unmix = torch.randn(5, 2, dtype=torch.float64)
    mean = torch.randn(5, dtype=torch.float64)
    model.ica_unmix.copy_(unmix)
    model.ica_mean.copy_(mean)
    assert model.embed[0].in_features == 5 and model.classifier.in_features == 2 + 4 + 8
    published = cls(5, 2, **kw).double().eval()
    published.load_state_dict({k: v for k, v in model.state_dict().items()
                               if not k.startswith(("classifier", "ica_"))}, strict=False)
    slides = [random_slide(42, dim=5), random_slide(43, dim=5, shape=(5, 7))]
    bag = Bag("d", slides)
    h = published._hidden(bag, bag.features)  # the published model's residual stream on the raw features
    scores, pooled = published.pool(published.norm(h))
    torch.testing.assert_close(published.classifier(pooled)[None], published(bag).logits)
    parts = []
    for s in slides:
        z = ((s.features.double() - mean) @ unmix).numpy()
        parts.append(np.concatenate([z, cooc_reference(s.coords, s.stride, z)], 1))
    u = np.concatenate([np.concatenate(parts), h.detach().numpy()], 1)
    out = model(bag)
    logits, ref_scores = _readout_reference(u, model.classifier.weight.detach(), model.classifier.bias.detach(),
                                            "topk", 2)
    np.testing.assert_allclose(out.logits.detach().numpy()[0], logits, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(out.scores.detach().numpy(), ref_scores, rtol=1e-10, atol=1e-10)


def test_channel_readout_trains_the_ssm_layer():
    """From the zero classifier, one step gives the classifier a gradient; after it, the SSM layer and
    the embedding get one too (source hidden)."""
    torch.manual_seed(4)
    model = TwoDMambaMIL(3, 2, dim=8, d_inner=16, d_state=4, pool="channels")
    s = random_slide(50, dim=3)
    bag = Bag("c", [SlideGrid.from_coords("f", s.features.float(), s.coords, s.stride)])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(bag).logits, torch.tensor([1])).backward()
        assert model.classifier.weight.grad.abs().sum() > 0
        if step == 1:
            for p in (model.embed[0].weight, next(model.layers[0].parameters())):
                assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
        opt.step()


def test_default_model_is_unchanged_by_the_option():
    m = TwoDMambaMIL(4, 2, dim=8, d_inner=16)
    assert m.pool_name == "attention" and m.channel_source is None and isinstance(m.norm, torch.nn.LayerNorm)
    assert m.classifier.in_features == 8


@pytest.mark.parametrize("kwargs,name", [
    ({"pool": "channels", "channel_source": "output"}, "channel_source"),
    ({"pool": "channels", "channel_pool": "max"}, "channel_pool"),
    ({"pool": "channels", "channel_pool": "lme", "pool_tau": 0}, "pool_tau"),
    ({"pool": "channels", "channel_pool": "lme", "pool_tau": True}, "pool_tau"),
    ({"pool": "channels", "channel_pool": "topk", "pool_tau": 2.0}, "pool_tau"),
    ({"pool": "channels", "pool_k": 0}, "pool_k"),
    ({"pool": "attention", "channel_source": "input"}, "channel_source"),
    ({"pool": "topk", "channel_pool": "lme"}, "channel_pool"),
    ({"pool_tau": 1.0}, "pool_tau"),
    ({"pool": "channel"}, "pool"),
    ({"pool": "channels", "ssm_input": "raw"}, "ssm_input"),
    ({"pool": "channels", "channel_source": "input", "ssm_input": "features"}, "ssm_input"),
    ({"ssm_input": "features"}, "ssm_input"),
])
def test_bad_readout_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        TwoDMambaMIL(6, 2, dim=8, d_inner=16, **kwargs)


@pytest.mark.parametrize("cls,scan", [(TwoDMambaMIL, "scan2d"), (M2DMIL, "wavefront2d")])
def test_default_model_draws_the_published_initial_weights(cls, scan):
    """With the options off, the model's initial weights for a seed are those of the published
    constructor sequence, spelled out here: embedding, RMSNorm, the SSM layer, LayerNorm, gated
    attention, classifier, then Xavier init of embedding, attention and classifier in that order.
    (The order of the random draws decides the initial weights; a reordered init trains differently.)"""
    from ssm2d_nn.layers import TwoDMambaLayer
    from ssm2d_path.models.common import GatedAttention, embedding, init_linear_

    kw = dict(dim=8, d_inner=16, d_state=4, dropout=0.1)
    torch.manual_seed(11)
    model = cls(6, 2, attn_dim=5, **kw)
    torch.manual_seed(11)
    embed = embedding(6, 8, 0.1)
    norms = torch.nn.ModuleList([torch.nn.RMSNorm(8, eps=1e-5)])
    layers = torch.nn.ModuleList([TwoDMambaLayer(8, 16, 4, None, 3, scan=scan)])
    norm = torch.nn.LayerNorm(8)
    pool = GatedAttention(8, 5)
    classifier = torch.nn.Linear(8, 2)
    init_linear_(embed, pool, classifier)
    want = {**{f"embed.{k}": v for k, v in embed.state_dict().items()},
            **{f"norms.{k}": v for k, v in norms.state_dict().items()},
            **{f"layers.{k}": v for k, v in layers.state_dict().items()},
            **{f"norm.{k}": v for k, v in norm.state_dict().items()},
            **{f"pool.{k}": v for k, v in pool.state_dict().items()},
            **{f"classifier.{k}": v for k, v in classifier.state_dict().items()}}
    got = model.state_dict()
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
