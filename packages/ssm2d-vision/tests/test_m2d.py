"""Mamba2D timm models: parameter counts against the released breakdown, timm API, features,
torch.compile, autocast, drop path, and the released-checkpoint conversion."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import ssm2d_vision  # noqa: F401  (registers the models)
import timm
from ssm2d_vision.convert import m2d as conv
from ssm2d_vision.models.m2d import M2DBlock, Mamba2D

VARIANTS = ("m2d_nano", "m2d_tiny", "m2d_small")
SPECS = {  # released configs: depths, dims, drop path (configs/M2D-{N,T,S}-ImageNet.yaml)
    "m2d_nano": ((3, 3, 9, 3), (32, 64, 160, 256), 0.0),
    "m2d_tiny": ((3, 3, 9, 3), (64, 128, 320, 512), 0.175),
    "m2d_small": ((3, 12, 14, 3), (96, 192, 384, 576), 0.4),
}
# ANCHORS.md, "Parameter breakdown of the released M2D models" and the Models table.
BREAKDOWN = {
    "m2d_nano": dict(total_k=7178, stem_ds=0.485, stages=(0.055, 0.198, 2.782, 2.369), head=1.291, block1=18308,
                     mixer1=9764, mlp1=8352, block3=309088, attn3=102528, mlp3=205600, heads3=5),
    "m2d_tiny": dict(total_k=26523, stem_ds=1.927, stages=(0.198, 0.745, 11.093, 9.455), head=3.105, block1=65796,
                     mixer1=32324, mlp1=33088, block3=1232448, attn3=409728, mlp3=820800, heads3=10),
    "m2d_small": dict(total_k=50274, stem_ds=2.836, stages=(0.428, 6.571, 24.834, 11.964), head=3.640,
                      block1=142468, mixer1=67684, mlp1=74208, block3=1773824, attn3=589952, mlp3=1181568, heads3=12),
}


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def meta_model(name, **kw):
    with torch.device("meta"):
        return timm.create_model(name, **kw)


def tiny_config(**kw):
    args = dict(depths=(2, 2, 1, 1), dims=(16, 32, 64, 64), num_classes=7)
    args.update(kw)
    return Mamba2D(**args)


# --- parameter counts --------------------------------------------------------------------------

@pytest.mark.parametrize("name", VARIANTS)
def test_parameter_breakdown_matches_released(name):
    m, want = meta_model(name), BREAKDOWN[name]
    assert round(count(m) / 1000) == want["total_k"]
    assert round((count(m.stem) + sum(count(s.downsample) for s in m.stages)) / 1e6, 3) == want["stem_ds"]
    stages = tuple(round((count(s) - count(s.downsample)) / 1e6, 3) for s in m.stages)
    assert stages == want["stages"]
    assert round(count(m.head) / 1e6, 3) == want["head"]
    b1, b3 = m.stages[0].blocks[0], m.stages[2].blocks[0]
    assert (count(b1), count(b1.token_mixer), count(b1.mlp)) == (want["block1"], want["mixer1"], want["mlp1"])
    assert (count(b3), count(b3.token_mixer), count(b3.mlp)) == (want["block3"], want["attn3"], want["mlp3"])
    assert b3.token_mixer.num_heads == want["heads3"]


def test_exact_totals_and_tiny_mixer_detail():
    assert [count(meta_model(n)) for n in VARIANTS] == [7178496, 26523136, 50273636]
    mixer = meta_model("m2d_tiny").stages[0].blocks[0].token_mixer
    detail = {n: count(c) for n, c in mixer.named_children()}
    assert detail == {"local_norm": 128, "local_path": 17540, "in_proj": 4160, "x_proj": 3584, "dt_projT": 320,
                      "dt_projL": 320, "out_proj": 4160}
    assert mixer.AT_log.numel() + mixer.AL_log.numel() == 2048 and mixer.D.numel() == 64
    assert (mixer.dt_rank, mixer.d_state, mixer.d_inner) == (4, 16, 64)


# --- structure as released ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["m2d_tiny", "m2d_small"])
def test_drop_path_per_block_and_scan_origins(name):
    depths, _, rate = SPECS[name]
    m = meta_model(name)
    blocks = [b for s in m.stages for b in s.blocks]
    expect = [rate * k / (sum(depths) - 1) for k in range(sum(depths))]
    for blk, p in zip(blocks, expect):
        got = getattr(blk.drop_path1, "drop_prob", 0.0)
        assert math.isclose(got, p, rel_tol=1e-6, abs_tol=1e-7)
        assert getattr(blk.drop_path2, "drop_prob", 0.0) == got
    for i in (0, 1):
        origins = [b.token_mixer.origin for b in m.stages[i].blocks]
        assert origins == ["tl" if j % 2 == 0 else "br" for j in range(depths[i])]
    assert m.head.fc.head_drop.p == {"m2d_tiny": 0.15, "m2d_small": 0.4}[name]


def test_block_formula_with_residual_scales():
    torch.manual_seed(0)
    blk = M2DBlock(32, "attention").double()
    with torch.no_grad():
        blk.res_scale1.scale.uniform_(0.5, 1.5)
        blk.res_scale2.scale.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 4, 32, dtype=torch.float64)
    y = blk.res_scale1.scale * x + blk.token_mixer(blk.norm1(x))
    y = blk.res_scale2.scale * y + blk.mlp(blk.norm2(y))
    assert torch.allclose(blk(x), y, atol=1e-13)


# --- timm API ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", VARIANTS)
def test_create_model_registered(name):
    assert name in timm.list_models("m2d_*")
    m = meta_model(name, num_classes=10)
    assert m.get_classifier().fc2.out_features == 10
    assert m.pretrained_cfg["first_conv"] == "stem.conv"
    assert [f["reduction"] for f in m.feature_info] == [4, 8, 16, 32]
    assert [f["num_chs"] for f in m.feature_info] == list(SPECS[name][1])


def test_nano_forward_kernel_equals_reference_float64():
    torch.manual_seed(1)
    mk = timm.create_model("m2d_nano", backend="kernel").double().eval()
    mr = timm.create_model("m2d_nano", backend="reference").double().eval()
    mr.load_state_dict(mk.state_dict())
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        yk, yr = mk(x), mr(x)
    assert yk.shape == (2, 1000)
    assert ((yk - yr).norm() / yr.norm()).item() < 1e-10


def test_head_api_and_intermediates():
    torch.manual_seed(2)
    m = tiny_config().eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats = m.forward_features(x)
        assert feats.shape == (2, 64, 2, 3)
        pre = m.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, 64)
        assert torch.allclose(m.head.fc(pre), m(x), atol=1e-6)
        assert torch.allclose(pre, torch.nn.functional.layer_norm(feats.mean((2, 3)), (64,), m.head.norm.weight,
                                                                   m.head.norm.bias), atol=1e-6)
        final, inter = m.forward_intermediates(x)
        assert torch.allclose(final, feats) and [t.shape[1:] for t in inter] == [
            (16, 16, 24), (32, 8, 12), (64, 4, 6), (64, 2, 3)]
        only = m.forward_intermediates(x, indices=[1], intermediates_only=True)
        assert len(only) == 1 and torch.allclose(only[0], inter[1])
        nhwc = m.forward_intermediates(x, indices=2, output_fmt="NHWC", intermediates_only=True)
        assert torch.allclose(nhwc[-1], inter[-1].permute(0, 2, 3, 1))
    m.reset_classifier(3)
    assert m(x).shape == (2, 3) and m.num_classes == 3
    m.reset_classifier(0)
    assert m(x).shape == (2, 64)
    with pytest.raises(ValueError, match="global_pool"):
        m.reset_classifier(5, global_pool="max")
    assert m.prune_intermediate_layers(indices=[0, 1]) == [0, 1] and len(m.stages) == 2
    assert m.num_features == 32 and isinstance(m.head.norm, torch.nn.Identity)
    full = tiny_config()
    w = full.head.norm.weight
    assert full.prune_intermediate_layers(indices=4, prune_norm=False) == [0, 1, 2, 3]
    assert full.head.norm.weight is w and isinstance(full.head.fc, torch.nn.Identity) and full.num_classes == 0
    assert full(x).shape == (2, 64)


def test_no_weight_decay_group_matcher_grad_checkpointing():
    torch.manual_seed(3)
    m = tiny_config()
    nwd = m.no_weight_decay()
    assert "stages.0.blocks.1.token_mixer.AT_log" in nwd and "stages.1.blocks.0.token_mixer.D" in nwd
    assert all(n.endswith(("AT_log", "AL_log", ".D")) for n in nwd) and len(nwd) == 4 * 3
    params = dict(m.named_parameters())
    assert nwd <= set(params) and nwd == {n for n, p in params.items() if getattr(p, "_no_weight_decay", False)}
    import copy
    assert copy.deepcopy(m).no_weight_decay() == nwd
    gm = m.group_matcher()
    assert gm["stem"] == r"^stem"
    x = torch.randn(1, 3, 64, 64)
    m.train()
    ref = m(x).sum()
    ref.backward()
    g_ref = m.stem.conv.weight.grad.clone()
    m.zero_grad()
    m.set_grad_checkpointing(True)
    out = m(x).sum()
    out.backward()
    assert torch.allclose(out, ref) and torch.allclose(m.stem.conv.weight.grad, g_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("size", [(224, 224), (512, 512), (256, 320)])
def test_features_only_nano(size):
    torch.manual_seed(4)
    f = timm.create_model("m2d_nano", features_only=True).eval()
    assert f.feature_info.channels() == [32, 64, 160, 256] and f.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        feats = f(torch.randn(1, 3, *size))
    assert [tuple(t.shape) for t in feats] == [(1, c, size[0] // r, size[1] // r)
                                               for c, r in zip([32, 64, 160, 256], [4, 8, 16, 32])]
    assert all(torch.isfinite(t).all() for t in feats)


def test_timm_pretrained_file_after_conversion(tmp_path):
    sd = {k: torch.randn_like(v) for k, v in timm.create_model("m2d_nano").state_dict().items()}
    conv.save_state_dict(sd, str(tmp_path / "m2d_nano.pth"))
    overlay = dict(file=str(tmp_path / "m2d_nano.pth"))
    m = timm.create_model("m2d_nano", pretrained=True, pretrained_cfg_overlay=overlay)
    assert all(torch.equal(m.state_dict()[k], sd[k]) for k in sd)
    f = timm.create_model("m2d_nano", pretrained=True, features_only=True, pretrained_cfg_overlay=overlay)
    assert torch.equal(f.model.stages[3].norm.weight, sd["stages.3.norm.weight"])


def test_features_only_out_indices_prunes():
    f = timm.create_model("m2d_nano", features_only=True, out_indices=(0, 1))
    assert len(f.model.stages) == 2 and f.feature_info.channels() == [32, 64]
    assert [t.shape[1] for t in f(torch.randn(1, 3, 64, 64))] == [32, 64]


def test_torch_compile_aot_eager_small():
    torch.manual_seed(5)
    m = tiny_config(depths=(2, 1, 1, 1)).eval()
    x = torch.randn(2, 3, 64, 64)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)  # one graph: no breaks
    with torch.no_grad():
        assert torch.allclose(compiled(x), m(x), rtol=1e-4, atol=1e-5)
    m.train()
    compiled(x).sum().backward()
    assert m.stages[0].blocks[0].token_mixer.AT_log.grad is not None


def test_bf16_autocast_cpu():
    torch.manual_seed(6)
    m = tiny_config().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert ((out.float() - ref).norm() / ref.norm()).item() < 0.05


# --- released checkpoints ----------------------------------------------------------------------

def released_shapes(name: str, num_classes: int = 1000) -> dict:
    """Key names and shapes of the released LightningModule state dict, written from the released
    definition (ds.stem / ds.ds{i} Downsampling, ResBlock with norm1/token_mixer/res_scale/MLP,
    M2DBlock with local path, RoPEAttention2D, a LayerNorm closing each stage, classifier norm + MlpHead)."""
    depths, dims, _ = SPECS[name]
    out = {"backbone.ds.stem.conv.weight": (dims[0], 3, 7, 7), "backbone.ds.stem.conv.bias": (dims[0],),
           "backbone.ds.stem.post_norm.norm.weight": (dims[0],), "backbone.ds.stem.post_norm.norm.bias": (dims[0],)}
    for i in range(1, 4):
        out[f"backbone.ds.ds{i}.conv.weight"] = (dims[i], dims[i - 1], 3, 3)
        out[f"backbone.ds.ds{i}.conv.bias"] = (dims[i],)
    for i, (d, c) in enumerate(zip(depths, dims)):
        for j in range(d):
            p = f"backbone.stages.{i}.{j}."
            for ln in ("norm1", "norm2"):
                out[p + ln + ".weight"] = out[p + ln + ".bias"] = (c,)
            out[p + "res_scale1.scale"] = out[p + "res_scale2.scale"] = (c,)
            out[p + "MLP.fc1.weight"], out[p + "MLP.fc1.bias"] = (4 * c, c), (4 * c,)
            out[p + "MLP.fc2.weight"], out[p + "MLP.fc2.bias"] = (c, 4 * c), (c,)
            t = p + "token_mixer."
            if i < 2:
                r, n = math.ceil(c / 16), 16
                out.update({t + "local_norm.weight": (c,), t + "local_norm.bias": (c,),
                            t + "local_path.pwconv1.weight": (2 * c, c), t + "local_path.act1.scale": (1,),
                            t + "local_path.act1.bias": (1,), t + "local_path.dwconv.weight": (2 * c, 1, 3, 3),
                            t + "local_path.act2.scale": (1,), t + "local_path.act2.bias": (1,),
                            t + "local_path.pwconv2.weight": (c, 2 * c), t + "in_proj.weight": (c, c),
                            t + "in_proj.bias": (c,), t + "x_proj.weight": (2 * r + 3 * n, c),
                            t + "dt_projT.weight": (c, r), t + "dt_projT.bias": (c,), t + "dt_projL.weight": (c, r),
                            t + "dt_projL.bias": (c,), t + "AT_log": (c, n), t + "AL_log": (c, n), t + "D": (c,),
                            t + "out_proj.weight": (c, c), t + "out_proj.bias": (c,)})
            else:
                a = (c // 32) * 32
                out.update({t + "qkv.weight": (3 * a, c), t + "proj.weight": (c, a), t + "q_norm.weight": (32,),
                            t + "q_norm.bias": (32,), t + "k_norm.weight": (32,), t + "k_norm.bias": (32,)})
        out[f"backbone.stages.{i}.{d}.weight"] = out[f"backbone.stages.{i}.{d}.bias"] = (c,)
    c = dims[-1]
    out.update({"norm.weight": (c,), "norm.bias": (c,), "head.fc1.weight": (4 * c, c), "head.fc1.bias": (4 * c,),
                "head.norm.weight": (4 * c,), "head.norm.bias": (4 * c,), "head.fc2.weight": (num_classes, 4 * c),
                "head.fc2.bias": (num_classes,)})
    return out


@pytest.mark.parametrize("name", VARIANTS)
def test_released_keys_map_exactly(name):
    rel = released_shapes(name)
    assert sum(math.prod(s) for s in rel.values()) == count(meta_model(name))  # the hand-written layout is whole
    fake = {k: torch.empty(s, device="meta") for k, s in rel.items()}
    ours = conv.released_to_ours(fake, name)
    model_sd = meta_model(name).state_dict()
    assert set(ours) == set(model_sd)
    assert all(tuple(ours[k].shape) == tuple(model_sd[k].shape) for k in ours)
    back = conv.ours_to_released(model_sd, name)
    assert {k: tuple(v.shape) for k, v in back.items()} == rel


def test_round_trip_bit_exact_through_file(tmp_path):
    torch.manual_seed(7)
    name = "m2d_nano"
    nano = timm.create_model(name)
    sd = {k: torch.randn_like(v) for k, v in nano.state_dict().items()}
    released = conv.ours_to_released(sd, name)
    path = tmp_path / "last.ckpt"
    conv.save_state_dict({"state_dict": released, "epoch": 3, "global_step": 10}, str(path))
    loaded = conv.load_released(str(path), name)
    assert set(loaded) == set(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)
    nano.load_state_dict(loaded)  # strict


def test_load_released_layouts_and_errors(tmp_path):
    name = "m2d_nano"
    sd = {k: torch.randn_like(v) for k, v in timm.create_model(name, num_classes=5).state_dict().items()}
    released = conv.ours_to_released(sd, name)
    # mmseg checkpoint: backbone keys with task heads next to them, no classifier head
    mmseg = {k: v for k, v in released.items() if k.startswith("backbone.")}
    mmseg["decode_head.conv_seg.weight"] = torch.zeros(3)
    torch.save({"meta": {"epoch": 1}, "state_dict": mmseg}, tmp_path / "seg.pth")
    bb = conv.load_released(str(tmp_path / "seg.pth"), name)
    assert set(bb) == {k for k in sd if not k.startswith("head.")}
    headless = timm.create_model(name, num_classes=0)
    assert headless.load_state_dict(bb, strict=False).missing_keys == ["head.norm.weight", "head.norm.bias"]
    # bare backbone + compile/DDP prefixes, head of 5 classes
    bare = {("module._orig_mod." + k.removeprefix("backbone.")): v for k, v in released.items()}
    torch.save(bare, tmp_path / "bare.pth")
    got = conv.load_released(str(tmp_path / "bare.pth"), name)
    assert set(got) == set(sd) and got["head.fc.fc2.weight"].shape[0] == 5
    # missing and unexpected keys: raise with the lists, or warn and keep the rest
    broken = dict(released)
    del broken["backbone.stages.1.2.token_mixer.D"]
    broken["backbone.stages.0.0.token_mixer.bogus"] = torch.zeros(1)
    torch.save({"state_dict": broken}, tmp_path / "broken.ckpt")
    with pytest.raises(ValueError, match=r"missing \(1\).*stages\.1\.blocks\.2\.token_mixer\.D.*unexpected \(1\)"):
        conv.load_released(str(tmp_path / "broken.ckpt"), name)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        part = conv.load_released(str(tmp_path / "broken.ckpt"), name, strict=False)
    assert any("missing" in str(x.message) for x in w) and "stages.0.blocks.0.token_mixer.bogus" not in part
    with pytest.raises(ValueError, match="no counterpart"):
        conv.released_to_ours({"backbone.stages.7.0.norm1.weight": torch.zeros(1)}, name)
    with pytest.raises(ValueError, match="model_name"):
        conv.released_to_ours({}, "m2d_huge")
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        conv.load_released(str(tmp_path / "nope.ckpt"), name)
    # wrong model for the checkpoint: shape mismatches are named
    with pytest.raises(ValueError, match="shape mismatch"):
        conv.load_released(str(tmp_path / "bare.pth"), "m2d_tiny")


# --- GPU ---------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_tiny_cuda_bf16_kernel_matches_reference_forward_backward():
    torch.manual_seed(8)
    mk = timm.create_model("m2d_tiny", backend="kernel", drop_path_rate=0.0, drop_rate=0.0).cuda()
    mr = timm.create_model("m2d_tiny", backend="reference", drop_path_rate=0.0, drop_rate=0.0).cuda()
    mr.load_state_dict(mk.state_dict())
    x = torch.randn(2, 3, 96, 96, device="cuda")
    outs, grads = [], []
    for m in (mk, mr):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = m(x)
        y.float().square().mean().backward()
        outs.append(y.float())
        grads.append(m.stages[0].blocks[1].token_mixer.in_proj.weight.grad.float())
    assert ((outs[0] - outs[1]).norm() / outs[1].norm()).item() < 2e-2
    assert ((grads[0] - grads[1]).norm() / grads[1].norm()).item() < 5e-2


@pytest.mark.gpu
def test_tiny_cuda_compile_inductor():
    torch.manual_seed(9)
    m = timm.create_model("m2d_tiny").cuda().eval()
    x = torch.randn(4, 3, 224, 224, device="cuda")
    compiled = torch.compile(m)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        ref, out = m(x).float(), compiled(x).float()
    assert ((out - ref).norm() / ref.norm()).item() < 2e-2
    m.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        torch.compile(m)(x[:2]).float().mean().backward()
    assert torch.isfinite(m.stages[0].blocks[0].token_mixer.AT_log.grad).all()


def test_convert_command_line_writes_our_state_dict(tmp_path):
    # The registry routes m2d_* to the M2D converter; the written file loads into the model exactly.
    import timm

    from ssm2d_vision.convert import cli
    from ssm2d_vision.convert import m2d as conv

    source = timm.create_model("m2d_nano")
    src, dst = tmp_path / "M2D-N.ckpt", tmp_path / "m2d_nano.pth"
    torch.save({"state_dict": conv.ours_to_released(source.state_dict(), "m2d_nano")}, src)
    assert cli.main(["--model", "m2d_nano", str(src), str(dst)]) == 0
    loaded = torch.load(dst, map_location="cpu", weights_only=True)
    ref = source.state_dict()
    assert loaded.keys() == ref.keys()
    assert all(torch.equal(loaded[k], ref[k]) for k in ref)
    assert cli.main(["--model", "m2d_nano", str(dst), str(tmp_path / "again.pth")]) == 1  # not a released file
