"""The timm model contract of both families: argument checks, device/dtype factory arguments,
classifier reset and unpooled heads, torch.fx feature extraction, TorchScript declared unsupported,
and pretrained weights loaded the timm way from converted (and from the authors') checkpoints.

(timm's own tests/test_models.py runs over all eight models in the integration suite:
tests/test_timm_model_suite.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ssm2d_vision  # noqa: F401  (registers the models; before timm for the torchvision repair)
import timm
from ssm2d_nn.layers import M2DMixer, RoPEAttention2d, SS2D
from ssm2d_vision.convert import vmamba as vconv
from ssm2d_vision.convert.cli import main as convert_main

FAMILIES = ["vmamba_tiny", "m2d_nano"]
# Small members of each family (same code paths, seconds on a CPU).
SMALL = {"vmamba_tiny": dict(depths=(1, 1, 2, 1), dims=(16, 24, 32, 40), drop_path_rate=0.0),
         "m2d_nano": dict(depths=(1, 2, 1, 1), dims=(16, 32, 64, 64))}


def meta(name, **kw):
    return timm.create_model(name, device="meta", **kw)


# ---- argument checks ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_bad_num_classes_and_in_chans_are_refused_naming_the_argument(name):
    with pytest.raises(ValueError, match=r"num_classes must be an int >= 0 \(0: no classifier\), got -1"):
        meta(name, num_classes=-1)
    with pytest.raises(ValueError, match=r"in_chans must be an int >= 1 .*got 0"):
        meta(name, in_chans=0)
    model = meta(name, num_classes=3)
    with pytest.raises(ValueError, match="num_classes must be an int >= 0"):
        model.reset_classifier(-1)
    assert model.num_classes == 3 and model.get_classifier() is not None


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("out_indices,what", [((), r"got an empty tuple"), ([], r"got an empty list"),
                                              ((1, 1), r"stage\(s\) \[1\] more than once"),
                                              ((0, 3, -1), r"stage\(s\) \[3\] more than once"),
                                              ((0, 4), r"got \(0, 4\)"), (0, r"got 0"), (5, r"got 5")])
def test_bad_out_indices_are_refused_naming_the_argument(name, out_indices, what):
    with pytest.raises(ValueError, match=rf"out_indices must be an int n in 1\.\.4 .*{what}"):
        meta(name, features_only=True, out_indices=out_indices)


@pytest.mark.parametrize("name", FAMILIES)
def test_good_out_indices_still_work(name):
    feats = meta(name, features_only=True, out_indices=(1, -1))
    assert feats.feature_info.reduction() == [8, 32]
    model = meta(name)
    last_two = model.forward_intermediates(torch.empty(1, 3, 64, 64, device="meta"), indices=2, intermediates_only=True)
    assert [t.shape[1] for t in last_two] == [model.feature_info[i]["num_chs"] for i in (2, 3)]
    with pytest.raises(ValueError, match=r"indices must be .*more than once"):
        model.forward_intermediates(torch.empty(1, 3, 64, 64, device="meta"), indices=[2, 2])


# ---- device / dtype, in_chans ---------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_device_and_dtype_reach_every_tensor_and_in_chans_is_exposed(name):
    model = timm.create_model(name, device="meta", dtype=torch.float64, in_chans=1)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    assert {(t.device.type, t.dtype) for t in tensors.values()} == {("meta", torch.float64)}
    assert model.in_chans == 1 and model.pretrained_cfg["first_conv"] + ".weight" in tensors
    assert tensors[model.pretrained_cfg["first_conv"] + ".weight"].shape[1] == 1
    out = model(torch.empty(2, 1, 96, 64, device="meta", dtype=torch.float64))
    assert out.shape == (2, 1000) and out.dtype == torch.float64


@pytest.mark.parametrize("name", FAMILIES)
def test_reset_classifier_follows_the_model_device_dtype_and_mode(name):
    model = meta(name).eval()
    model.to(dtype=torch.float64)
    model.reset_classifier(0)
    model.reset_classifier(7)
    params = list(model.get_classifier().parameters())
    assert params and {(p.device.type, p.dtype) for p in params} == {("meta", torch.float64)}
    assert params[-1].shape[0] == 7 and model.num_classes == 7
    assert not any(m.training for m in model.modules())


# ---- unpooled heads (global_pool="") --------------------------------------------------------------
def test_m2d_head_without_pooling_runs_at_every_position():
    torch.manual_seed(0)
    model = timm.create_model("m2d_nano", num_classes=5, **SMALL["m2d_nano"]).eval()
    x = torch.randn(2, 3, 64, 96)
    norm = model.head.norm
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 64, 2, 3)
        pooled_pre = model.forward_head(feats, pre_logits=True)
        model.reset_classifier(5, global_pool="")
        dense_pre = model.forward_head(feats, pre_logits=True)
        dense = model(x)
        fc = model.head.fc
        model.reset_classifier(0, "")
        plain = model(x)
    # the released head is GAP -> LayerNorm -> MLP; without pooling: LayerNorm over the channels at
    # every position, then the MLP at every position
    ln = lambda t: F.layer_norm(t, norm.normalized_shape, norm.weight, norm.bias, norm.eps)  # noqa: E731
    torch.testing.assert_close(pooled_pre, ln(feats.mean((2, 3))))
    expected_pre = ln(feats.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(dense_pre, expected_pre)
    assert dense.shape == (2, 5, 2, 3)
    with torch.no_grad():
        torch.testing.assert_close(dense[:, :, 1, 2], fc(expected_pre[:, :, 1, 2]))
    torch.testing.assert_close(plain, expected_pre)
    assert model.num_classes == 0 and model.global_pool == ""
    bare = timm.create_model("m2d_nano", num_classes=0, global_pool="", **SMALL["m2d_nano"])
    assert bare(x).shape == (2, 64, 2, 3)
    with pytest.raises(ValueError, match=r"global_pool must be 'avg' .* or '' \(no pooling\), got 'max'"):
        timm.create_model("m2d_nano", global_pool="max", **SMALL["m2d_nano"])


def test_vmamba_head_without_pooling():
    torch.manual_seed(0)
    model = timm.create_model("vmamba_tiny", num_classes=5, **SMALL["vmamba_tiny"]).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 40, 2, 3)
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True), feats.mean((2, 3)))
        model.reset_classifier(0, "")
        torch.testing.assert_close(model(x), feats)
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True), feats)
    bare = timm.create_model("vmamba_tiny", num_classes=0, global_pool="", **SMALL["vmamba_tiny"])
    assert bare(x).shape == (2, 40, 2, 3)


# ---- torch.fx --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_fx_feature_extraction(name):
    torch.manual_seed(1)
    model = timm.create_model(name, **SMALL[name]).eval()
    x = torch.randn(1, 3, 64, 64)
    # M2D's stages work channels last: their outputs (what FX returns) are NHWC
    nchw = (lambda t: t.permute(0, 3, 1, 2)) if name == "m2d_nano" else (lambda t: t)
    extractor = timm.models.create_feature_extractor(model, return_nodes={"stages.1": "s1", "stages.3": "s3"})
    leaves = {type(m) for m in extractor.modules()}
    assert leaves & {SS2D, M2DMixer, RoPEAttention2d}, "the mixers are kept as leaves"
    with torch.no_grad():
        got = extractor(x)
        expected = model.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
    torch.testing.assert_close(nchw(got["s1"]), expected[0])
    torch.testing.assert_close(nchw(got["s3"]), expected[1])
    # features_only through FX (same seed: the same stage weights)
    torch.manual_seed(1)
    fx_feats = timm.create_model(name, features_only=True, feature_cls="fx", out_indices=(0, 2), **SMALL[name])
    outs = fx_feats(x)
    with torch.no_grad():
        expected = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
    assert len(outs) == 2
    for o, e in zip(outs, expected):
        torch.testing.assert_close(nchw(o.detach()), e)
    sum(o.sum() for o in outs).backward()
    used = {n: p for n, p in fx_feats.named_parameters() if ".stem." in f".{n}" or any(
        f"stages.{i}." in n for i in (0, 1, 2))}
    assert used and all(p.grad is not None for p in used.values())


# ---- TorchScript -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name,owner", [("vmamba_tiny", "VMamba"), ("m2d_nano", "Mamba2D")])
def test_torchscript_is_declared_unsupported(name, owner):
    model = timm.create_model(name, **SMALL[name])
    with pytest.raises(RuntimeError, match=rf"{owner} is not TorchScript-scriptable.*torch\.compile"):
        torch.jit.script(model)


# ---- pretrained weights the timm way ---------------------------------------------------------------
def _authors_checkpoint(tmp_path):
    """A randomly initialised vmamba_tiny, saved in the authors' layout ({'model': released keys})."""
    torch.manual_seed(2)
    ours = {k: torch.randn_like(v) for k, v in timm.create_model("vmamba_tiny").state_dict().items()}
    released, unknown = vconv.ours_to_released(ours, "vmamba_tiny")
    assert not unknown
    path = tmp_path / "vssm1_tiny_random.pth"
    torch.save({"model": released, "epoch": 1}, path)
    return ours, path


def test_vmamba_pretrained_from_a_converted_file(tmp_path):
    ours, authors = _authors_checkpoint(tmp_path)
    converted = tmp_path / "converted.pth"
    assert convert_main(["--model", "vmamba_tiny", str(authors), str(converted)]) == 0
    overlay = dict(file=str(converted))
    model = timm.create_model("vmamba_tiny", pretrained=True, pretrained_cfg_overlay=overlay)
    state = model.state_dict()
    assert state.keys() == ours.keys() and all(torch.equal(state[k], ours[k]) for k in ours)
    # the authors' file itself loads the same way (converted while loading)
    direct = timm.create_model("vmamba_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(authors)))
    assert all(torch.equal(direct.state_dict()[k], ours[k]) for k in ours)
    # a new head: the checkpoint's classifier is left out, everything else loaded
    ten = timm.create_model("vmamba_tiny", pretrained=True, num_classes=10, pretrained_cfg_overlay=overlay)
    assert ten.get_classifier().out_features == 10
    assert torch.equal(ten.state_dict()["stages.2.blocks.3.ssm.A_logs"], ours["stages.2.blocks.3.ssm.A_logs"])
    # dense prediction: the stages from the file, the per-stage norms from their initialisation
    feats = timm.create_model("vmamba_tiny", pretrained=True, features_only=True, pretrained_cfg_overlay=overlay)
    fs = feats.model.state_dict()
    assert torch.equal(fs["stages.3.blocks.1.mlp.fc2.weight"], ours["stages.3.blocks.1.mlp.fc2.weight"])
    assert all(torch.equal(fs[f"out_norms.{i}.weight"], torch.ones_like(fs[f"out_norms.{i}.weight"])) and
               torch.equal(fs[f"out_norms.{i}.bias"], torch.zeros_like(fs[f"out_norms.{i}.bias"])) for i in range(4))


def test_vmamba_pretrained_file_with_missing_keys_fails(tmp_path):
    ours, _ = _authors_checkpoint(tmp_path)
    del ours["stages.1.blocks.0.ssm.Ds"]
    path = tmp_path / "broken.pth"
    torch.save(ours, path)
    with pytest.raises(RuntimeError, match=r"stages\.1\.blocks\.0\.ssm\.Ds"):
        timm.create_model("vmamba_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
