"""VMamba v2 / 2DVMamba timm models: parameter counts, timm API, dense features, converters."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import ssm2d_vision  # noqa: F401  (registers the models; before timm for the torchvision repair)
import timm
from ssm2d_vision.convert import converter_for
from ssm2d_vision.convert import vmamba as conv
from ssm2d_vision.models.vmamba import VMamba

NAMES = ["vmamba_tiny", "vmamba_small", "vmamba_base", "vmamba2d_tiny", "vmamba2d_small"]
# Exact counts of the released definitions with the 1000-class head (spec ANCHORS.md).
RELEASED_PARAMS = {"vmamba_tiny": 30_249_064, "vmamba_small": 50_147_752, "vmamba_base": 88_557_800,
                   "vmamba2d_tiny": 30_249_064, "vmamba2d_small": 50_147_752}
# The released builders: (depths, dims, ssm_ratio, drop_path_rate).
RELEASED_CFG = {"vmamba_tiny": ((2, 2, 8, 2), 96, 1.0, 0.2), "vmamba_small": ((2, 2, 15, 2), 96, 2.0, 0.3),
                "vmamba_base": ((2, 2, 15, 2), 128, 2.0, 0.6), "vmamba2d_tiny": ((2, 2, 8, 2), 96, 1.0, 0.2),
                "vmamba2d_small": ((2, 2, 15, 2), 96, 2.0, 0.3)}
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def small_model(scan="cross1d", **kw):
    """A fast model with the full structure: 4 stages, odd/even sizes, N = 2, ratio 1.5."""
    args = dict(depths=(1, 1, 2, 1), dims=(16, 24, 32, 40), d_state=2, ssm_ratio=1.5, scan=scan, num_classes=10,
                drop_path_rate=0.0)
    args.update(kw)
    return VMamba(**args)


def released_state_shapes(depths, dims0, ratio, num_classes=1000, d_state=1, outnorms=False):
    """Key -> shape of the released VSSM (v05_noz, ln2d, patchembed v2, downsample v3), written from
    its module tree: patch_embed Sequential(conv, Id, LN, Id, GELU, conv, Id, LN), layers[i] =
    Sequential(blocks, downsample = Sequential(Id, conv, Id, LN)), classifier.{norm, head}."""
    dims = [dims0 * 2 ** i for i in range(4)]
    s = {"patch_embed.0.weight": (dims0 // 2, 3, 3, 3), "patch_embed.0.bias": (dims0 // 2,),
         "patch_embed.2.weight": (dims0 // 2,), "patch_embed.2.bias": (dims0 // 2,),
         "patch_embed.5.weight": (dims0, dims0 // 2, 3, 3), "patch_embed.5.bias": (dims0,),
         "patch_embed.7.weight": (dims0,), "patch_embed.7.bias": (dims0,)}
    for i, (depth, c) in enumerate(zip(depths, dims)):
        d, r, n = int(ratio * c), math.ceil(c / 16), d_state
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            s.update({p + "norm.weight": (c,), p + "norm.bias": (c,),
                      p + "op.in_proj.weight": (d, c), p + "op.conv2d.weight": (d, 1, 3, 3),
                      p + "op.x_proj_weight": (4, r + 2 * n, d), p + "op.dt_projs_weight": (4, d, r),
                      p + "op.dt_projs_bias": (4, d), p + "op.A_logs": (4 * d, n), p + "op.Ds": (4 * d,),
                      p + "op.out_norm.weight": (d,), p + "op.out_norm.bias": (d,), p + "op.out_proj.weight": (c, d),
                      p + "norm2.weight": (c,), p + "norm2.bias": (c,),
                      p + "mlp.fc1.weight": (4 * c, c), p + "mlp.fc1.bias": (4 * c,),
                      p + "mlp.fc2.weight": (c, 4 * c), p + "mlp.fc2.bias": (c,)})
        if i < 3:
            s.update({f"layers.{i}.downsample.1.weight": (2 * c, c, 3, 3), f"layers.{i}.downsample.1.bias": (2 * c,),
                      f"layers.{i}.downsample.3.weight": (2 * c,), f"layers.{i}.downsample.3.bias": (2 * c,)})
        if outnorms:
            s.update({f"outnorm{i}.weight": (c,), f"outnorm{i}.bias": (c,)})
    if num_classes:
        s.update({"classifier.norm.weight": (dims[-1],), "classifier.norm.bias": (dims[-1],),
                  "classifier.head.weight": (num_classes, dims[-1]), "classifier.head.bias": (num_classes,)})
    return s


def random_state(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v, generator=g) for k, v in shapes.items()}


# ---- counts and configuration -------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_is_exactly_the_released_one(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == RELEASED_PARAMS[name]
    # and equal to the sum over the released key shapes (an independent hand count)
    depths, dims0, ratio, _ = RELEASED_CFG[name]
    assert sum(math.prod(s) for s in released_state_shapes(depths, dims0, ratio).values()) == RELEASED_PARAMS[name]


@pytest.mark.parametrize("name", NAMES)
def test_drop_path_and_scan_as_released(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    depths, _, _, rate = RELEASED_CFG[name]
    probs = [getattr(b.drop_path, "drop_prob", 0.0) for s in model.stages for b in s.blocks]
    expected = [rate * i / (sum(depths) - 1) for i in range(sum(depths))]
    assert probs == pytest.approx(expected, abs=1e-6)
    assert probs[-1] == pytest.approx(rate) and probs[0] == 0.0
    scans = {b.ssm.scan for s in model.stages for b in s.blocks}
    assert scans == {"2d" if name.startswith("vmamba2d") else "cross1d"}


def test_default_cfgs():
    for name in NAMES:
        cfg = timm.get_pretrained_cfg(name).to_dict()
        assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.875
        assert cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN and cfg["std"] == timm.data.IMAGENET_DEFAULT_STD
        assert cfg["classifier"] == "head.fc" and cfg["first_conv"] == "stem.conv1"


# ---- forward and timm API -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vmamba_tiny", "vmamba2d_tiny"])
def test_create_and_forward_full_model(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96))
    assert out.shape == (1, 7) and torch.isfinite(out).all()


def test_all_names_create():
    for name in NAMES:
        with torch.device("meta"):
            model = timm.create_model(name, num_classes=5)
        assert isinstance(model, VMamba) and model.get_classifier().out_features == 5


def test_timm_api_on_small_model():
    torch.manual_seed(0)
    model = small_model().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 40, 2, 2)
        pre = model.forward_head(feats, pre_logits=True)
        torch.testing.assert_close(pre, feats.mean((2, 3)))
        torch.testing.assert_close(model.forward_head(feats), model.head.fc(pre))
        final, inter = model.forward_intermediates(x)
        assert [t.shape[1:] for t in inter] == [(16, 16, 16), (24, 8, 8), (32, 4, 4), (40, 2, 2)]
        torch.testing.assert_close(final, feats)
        # timm's norm convention without per-stage norms: the final norm on the last stage only
        normed = model.forward_intermediates(x, indices=[1, 3], norm=True, intermediates_only=True)
        torch.testing.assert_close(normed[0], inter[1])
        torch.testing.assert_close(normed[1], feats)
        early = model.forward_intermediates(x, indices=2, stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[1], inter[3])
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    model.reset_classifier(0)
    assert model(x).shape == (2, 40)
    assert [f["reduction"] for f in model.feature_info] == [4, 8, 16, 32]
    assert [f["module"] for f in model.feature_info] == [f"stages.{i}" for i in range(4)]
    nwd = model.no_weight_decay()
    assert nwd and all(n.endswith(("A_logs", "Ds", "dt_projs_bias")) for n in nwd)
    assert sum(n.endswith("A_logs") for n in nwd) == 5  # one per block
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert sum(len(g) for g in groups.values()) == len(list(model.named_parameters()))


def test_prune_intermediate_layers():
    torch.manual_seed(0)
    model = small_model(out_norms=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        full = model.forward_intermediates(x, norm=True, intermediates_only=True)
        kept = model.prune_intermediate_layers([0, 1])
        assert kept == [0, 1] and len(model.stages) == 2
        pruned = model.forward_intermediates(x, indices=[0, 1], norm=True, intermediates_only=True)
    for a, b in zip(pruned, full[:2]):
        torch.testing.assert_close(a, b)


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = small_model()
    x = torch.randn(2, 3, 32, 32)
    model(x).square().sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-7, msg=n)


def test_2d_model_differs_from_cross1d_with_the_same_weights():
    torch.manual_seed(0)
    a = small_model("cross1d").eval()
    with torch.no_grad():
        for m in a.modules():
            if hasattr(m, "dt_projs_bias"):
                m.dt_projs_bias.fill_(-1.0)  # decay ~0.7 per step and small D: long scans dominate
                m.Ds.fill_(0.1)
                m.out_proj.weight.mul_(20)  # and the mixers, not the residual stream
    b = small_model("2d").eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ya, yb = a.forward_features(x), b.forward_features(x)
    # float32 noise between two equal paths is ~1e-6 relative; the scans change the output ~1e-3
    assert (ya - yb).abs().max() > 1e-4 * ya.abs().max()


def test_bf16_autocast_cpu():
    torch.manual_seed(0)
    for scan in ("cross1d", "2d"):
        model = small_model(scan).eval()
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            ref = model(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1)


def test_torch_compile_aot_eager_fullgraph():
    torch.manual_seed(0)
    for scan in ("cross1d", "2d"):
        model = small_model(scan, depths=(1, 1, 1, 1)).eval()
        x = torch.randn(1, 3, 32, 32)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x))


# ---- features_only ------------------------------------------------------------------------------
@pytest.mark.parametrize("hw", [(224, 224), (512, 512), (256, 320)])
def test_features_only_tiny(hw):
    torch.manual_seed(0)
    feat = timm.create_model("vmamba_tiny", features_only=True).eval()
    assert feat.feature_info.channels() == [96, 192, 384, 768]
    assert feat.feature_info.reduction() == [4, 8, 16, 32]
    assert feat.feature_info.module_name() == [f"stages.{i}" for i in range(4)]
    with torch.no_grad():
        outs = feat(torch.randn(1, 3, *hw))
    assert [tuple(o.shape) for o in outs] == [(1, c, hw[0] // s, hw[1] // s)
                                              for c, s in zip([96, 192, 384, 768], [4, 8, 16, 32])]
    # each output went through its stage's LayerNorm2d: zero mean, unit variance over channels
    for o in outs:
        torch.testing.assert_close(o.mean(1), torch.zeros_like(o.mean(1)), atol=1e-4, rtol=0)
    keys = feat.state_dict().keys()
    assert not any(k.startswith("model.head.") or k.startswith("model.norm.") for k in keys)


def test_features_only_raw_and_out_indices():
    feat = timm.create_model("vmamba2d_tiny", features_only=True, out_norms=False, out_indices=(1, 3)).eval()
    assert feat.feature_info.channels() == [192, 768]
    with torch.no_grad():
        outs = feat(torch.randn(1, 3, 64, 64))
    assert [tuple(o.shape) for o in outs] == [(1, 192, 8, 8), (1, 768, 2, 2)]


# ---- converters ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_converter_maps_exactly_onto_released_keys(name):
    depths, dims0, ratio, _ = RELEASED_CFG[name]
    released = released_state_shapes(depths, dims0, ratio)
    with torch.device("meta"):
        model = timm.create_model(name)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mapped, unknown = conv.ours_to_released({k: torch.empty(s, device="meta") for k, s in ours.items()}, name)
    assert unknown == []
    assert set(mapped) == set(released)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == released
    back, unknown = conv.released_to_ours({k: torch.empty(s, device="meta") for k, s in released.items()}, name)
    assert unknown == [] and {k: tuple(v.shape) for k, v in back.items()} == ours


def test_round_trip_bit_exact_and_loads_through_file(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("vmamba2d_tiny")
    sd = model.state_dict()
    released, unknown = conv.ours_to_released(sd, "vmamba2d_tiny")
    assert unknown == []
    path = tmp_path / "released.pth"
    torch.save({"model": released, "epoch": 300}, path)
    back = conv.load_released(str(path), "vmamba2d_tiny")
    assert back.keys() == sd.keys()
    for k in sd:
        assert back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k]), k
    fresh = timm.create_model("vmamba2d_tiny")
    conv.load_released(str(path), "vmamba2d_tiny", model=fresh)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_mmseg_backbone_checkpoint(tmp_path):
    released = random_state(released_state_shapes((2, 2, 8, 2), 96, 1.0, num_classes=0, outnorms=True))
    ckpt = {"meta": {"iter": 160000},
            "state_dict": {**{"backbone." + k: v for k, v in released.items()},
                           "decode_head.conv_seg.weight": torch.randn(150, 512, 1, 1)}}
    path = tmp_path / "upernet.pth"
    torch.save(ckpt, path)
    ours = conv.load_released(str(path), "vmamba_tiny")
    assert sum(k.startswith("out_norms.") for k in ours) == 8
    feat = timm.create_model("vmamba_tiny", features_only=True)
    feat.model.load_state_dict(ours, strict=True)
    torch.testing.assert_close(feat.model.out_norms[2].weight, released["outnorm2.weight"], rtol=0, atol=0)
    torch.testing.assert_close(feat.model.stages[1].downsample.conv.weight, released["layers.0.downsample.1.weight"],
                               rtol=0, atol=0)
    torch.testing.assert_close(feat.model.stages[0].blocks[1].ssm.in_proj.weight[:, :, 0, 0],
                               released["layers.0.blocks.1.op.in_proj.weight"], rtol=0, atol=0)


def test_load_released_reports_bad_keys(tmp_path):
    released = random_state(released_state_shapes((2, 2, 8, 2), 96, 1.0))
    del released["layers.2.blocks.7.op.Ds"]
    released["layers.9.blocks.0.op.Ds"] = torch.ones(3)
    released["some_extra.weight"] = torch.ones(3)
    released["layers.0.blocks.0.op.A_logs"] = torch.zeros(5, 1)
    path = tmp_path / "bad.pth"
    torch.save(released, path)
    with pytest.raises(RuntimeError) as info:
        conv.load_released(str(path), "vmamba_tiny")
    msg = str(info.value)
    for part in ("some_extra.weight", "stages.2.blocks.7.ssm.Ds", "stages.9.blocks.0.ssm.Ds",
                 "stages.0.blocks.0.ssm.A_logs"):
        assert part in msg
    with pytest.warns(UserWarning, match="missing keys"):
        conv.load_released(str(path), "vmamba_tiny", strict=False)
    with pytest.raises(ValueError, match="unknown VMamba model"):
        conv.released_to_ours(released, "vmamba_huge")


def test_registry_and_cli(tmp_path, capsys):
    from ssm2d_vision.convert.cli import main

    assert converter_for("vmamba2d_small") is conv
    with pytest.raises(ValueError, match="no converter"):
        converter_for("resnet50")
    released = random_state(released_state_shapes((2, 2, 8, 2), 96, 1.0))
    src, dst = tmp_path / "src.pth", tmp_path / "out" / "ours.pth"
    torch.save({"model": released}, src)
    assert main(["--model", "vmamba_tiny", str(src), str(dst)]) == 0
    ours = torch.load(dst, map_location="cpu", weights_only=True)
    model = timm.create_model("vmamba_tiny")
    model.load_state_dict(ours, strict=True)
    assert torch.equal(model.stages[2].blocks[3].ssm.x_proj_weight, released["layers.2.blocks.3.op.x_proj_weight"])
    assert [p.name for p in dst.parent.iterdir()] == ["ours.pth"]  # no temporary file left behind
    assert main(["--model", "vmamba_small", str(src), str(tmp_path / "x.pth")]) == 1
    assert "shape mismatches" in capsys.readouterr().err and not (tmp_path / "x.pth").exists()


def test_cli_module_entry_point():
    proc = subprocess.run([sys.executable, "-m", "ssm2d_vision.convert", "--help"], capture_output=True, text=True,
                          env=ENV)
    assert proc.returncode == 0 and "--model" in proc.stdout, proc.stderr


# ---- GPU ----------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["vmamba_tiny", "vmamba2d_tiny"])
def test_cuda_bf16_kernel_vs_reference_and_inductor(name):
    torch.manual_seed(0)
    # eval: no drop path, so both backends (and compiled vs eager) see the same network
    model = timm.create_model(name, num_classes=10, drop_path_rate=0.0).cuda().eval()
    x = torch.randn(2, 3, 64, 64, device="cuda")
    results = {}
    for backend in ("kernel", "reference"):
        for m in model.modules():
            if hasattr(m, "backend"):
                m.backend = backend
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().mean().backward()
        results[backend] = (out.float().detach(), {n: p.grad.float().clone() for n, p in model.named_parameters()})
    out_k, g_k = results["kernel"]
    out_r, g_r = results["reference"]
    torch.testing.assert_close(out_k, out_r, rtol=5e-2, atol=5e-2)
    for n in g_k:
        err = (g_k[n] - g_r[n]).norm() / g_r[n].norm().clamp_min(1e-12)
        assert err < 5e-2, (n, err.item())
    for m in model.modules():
        if hasattr(m, "backend"):
            m.backend = "auto"
    compiled = torch.compile(model)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out_c = compiled(x)
        out_e = model(x)
    out_c.float().sum().backward()
    torch.testing.assert_close(out_c.float(), out_e.float(), rtol=5e-2, atol=5e-2)
