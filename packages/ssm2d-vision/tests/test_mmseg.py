"""The mmsegmentation integration: registration, the mmcv.ops stand-in, checkpoints, shipped configs."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("mmseg", reason="mmsegmentation not installed (pip install 'ssm2d-vision[mmseg]')")

import ssm2d_vision.mmseg as ssm_mmseg  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmseg.registry import MODELS  # noqa: E402

from ssm2d_vision.mmseg import CONFIGS, SSM2DBackbone, config_path  # noqa: E402
from ssm2d_vision.mmseg import _mmcv_ops  # noqa: E402

# The backbone the tests build (switch to dict(model_name="m2d_nano", out_indices=(0, 1, 2, 3))).
BACKBONE = dict(model_name="m2d_nano", out_indices=(0, 1, 2, 3))

init_default_scope("mmseg")


def test_backbone_is_registered_and_returns_four_maps():
    model = MODELS.build(dict(type="SSM2DBackbone", **BACKBONE))
    assert isinstance(model, SSM2DBackbone)
    outs = model(torch.randn(2, 3, 64, 64))
    assert isinstance(outs, tuple) and len(outs) == 4
    assert [o.shape[1] for o in outs] == list(model.channels)
    assert [64 // o.shape[-1] for o in outs] == list(model.reductions) == [4, 8, 16, 32]


def test_frozen_stages_and_norm_eval():
    model = SSM2DBackbone(**BACKBONE, frozen_stages=1)
    names = [n for n, _ in model.model.named_parameters()]
    frozen = [n for n, p in model.model.named_parameters() if not p.requires_grad]
    levels = model.model.feature_info.module_name()

    def in_level(name, level):
        return f"{level}." in name or f"{level.replace('.', '_')}." in name

    # stem and the first two levels frozen, everything after trainable
    assert frozen == names[:len(frozen)] and names[0] in frozen
    assert any(in_level(n, levels[0]) for n in frozen)
    assert any(in_level(n, levels[1]) for n in frozen)
    assert not any(in_level(n, levels[2]) for n in frozen)
    # norm_eval keeps BatchNorm statistics fixed; the project's backbones use LayerNorm, so check it on a
    # timm backbone that has BatchNorm (SSM2DBackbone takes any features_only timm model).
    bn_model = SSM2DBackbone(model_name="resnet18", out_indices=(-4, -3, -2, -1), norm_eval=True)
    bn_model.train()
    bns = [m for m in bn_model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and not any(m.training for m in bns)
    with pytest.raises(ValueError, match="frozen_stages"):
        SSM2DBackbone(**BACKBONE, frozen_stages=7)


def test_checkpoint_round_trip_and_errors(tmp_path):
    import timm

    full = timm.create_model(BACKBONE["model_name"], num_classes=10)  # classification model, head included
    path = tmp_path / "ck.pth"
    torch.save({"state_dict": {"backbone." + k: v for k, v in full.state_dict().items()}}, path)
    model = SSM2DBackbone(**BACKBONE, checkpoint=str(path))
    loaded = {k: v.clone() for k, v in model.model.state_dict().items()}
    source = full.state_dict()
    # every backbone tensor equals the classification model's tensor of the same role
    feats_full = timm.create_model(BACKBONE["model_name"], features_only=True, out_indices=BACKBONE["out_indices"])
    feats_full.load_state_dict(loaded)
    x = torch.randn(1, 3, 64, 64)
    full.eval()
    feats_full.eval()
    with torch.no_grad():
        last = feats_full(x)[-1]
        expected = full.forward_features(x)
    torch.testing.assert_close(last, expected)
    assert len(loaded) < len(source)  # the classifier was ignored
    # the Runner calls init_weights() before training: it must not re-initialise the loaded weights
    model.init_weights()
    for key, value in model.model.state_dict().items():
        assert torch.equal(value, loaded[key]), key
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        SSM2DBackbone(**BACKBONE, checkpoint=str(tmp_path / "missing.pth"))
    torch.save({"unrelated.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="does not fit"):
        SSM2DBackbone(**BACKBONE, checkpoint=str(tmp_path / "bad.pth"))
    with pytest.raises(ValueError, match="model_name"):
        SSM2DBackbone("no_such_model_xyz")


def test_point_sample_stand_in_hits_pixel_centres():
    gen = torch.Generator().manual_seed(0)
    img = torch.randn(2, 3, 5, 7, generator=gen, dtype=torch.float64)
    rows = torch.randint(0, 5, (2, 6), generator=gen)
    cols = torch.randint(0, 7, (2, 6), generator=gen)
    pts = torch.stack([(cols.double() + 0.5) / 7, (rows.double() + 0.5) / 5], dim=-1)  # (x, y) in [0, 1]
    out = _mmcv_ops.point_sample(img, pts, align_corners=False)
    expected = torch.stack([img[b][:, rows[b], cols[b]] for b in range(2)])
    torch.testing.assert_close(out, expected)
    # halfway between two pixel centres: their mean (bilinear)
    mid = torch.tensor([[[(0.5 + 0.5 + 1) / 2 / 7, 0.5 / 5]]], dtype=torch.float64).expand(2, 1, 2)
    torch.testing.assert_close(_mmcv_ops.point_sample(img, mid)[..., 0], (img[:, :, 0, 0] + img[:, :, 0, 1]) / 2)


def test_sigmoid_focal_loss_stand_in_against_formula():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    target = torch.tensor([0, 3, 1, 4, 2, 2])  # 4 = negative for every class
    weight = torch.rand(6, generator=gen, dtype=torch.float64)
    gamma, alpha = 2.0, 0.25
    expected = torch.zeros(6, 4, dtype=torch.float64)
    for n in range(6):
        for c in range(4):
            p = torch.sigmoid(logits[n, c])
            if int(target[n]) == c:
                expected[n, c] = -alpha * (1 - p) ** gamma * torch.log(p)
            else:
                expected[n, c] = -(1 - alpha) * p ** gamma * torch.log(1 - p)
    expected = expected * weight[:, None]
    got = _mmcv_ops.sigmoid_focal_loss(logits, target, gamma, alpha, weight, "none")
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(_mmcv_ops.sigmoid_focal_loss(logits, target, gamma, alpha, weight, "mean"),
                               expected.sum() / 6)


def test_stand_in_only_when_mmcv_ops_is_missing():
    import mmcv

    mmcv_ops_real = True
    try:
        import importlib.util
        mmcv_ops_real = importlib.util.find_spec("mmcv._ext") is not None
    except (ImportError, ValueError):
        mmcv_ops_real = False
    assert ssm_mmseg.STAND_IN_INSTALLED is (not mmcv_ops_real)
    if ssm_mmseg.STAND_IN_INSTALLED:
        assert getattr(mmcv.ops, _mmcv_ops.STAND_IN_FLAG)
        # what mmseg's guarded imports catch
        with pytest.raises(ModuleNotFoundError, match="compiled op"):
            from mmcv.ops import CrissCrossAttention  # noqa: F401
        # a second import is a no-op
        assert _mmcv_ops.ensure_mmcv_ops() is True


def test_import_without_mmseg_names_the_extra():
    code = ("import sys; sys.modules['mmseg'] = None\n"
            "try:\n    import ssm2d_vision.mmseg\nexcept ImportError as e:\n    print('ERR', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert 'pip install "ssm2d-vision[mmseg]"' in proc.stdout


def test_import_logs_the_stand_in():
    code = "import logging; logging.basicConfig(level=logging.INFO); import ssm2d_vision.mmseg"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    if ssm_mmseg.STAND_IN_INSTALLED:
        assert "installed a pure-PyTorch stand-in" in proc.stderr


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shipped_config_loads_and_builds(name):
    import timm

    path = config_path(name)
    assert path == config_path(path.name)
    cfg = Config.fromfile(str(path))
    assert cfg.custom_imports["imports"] == ["ssm2d_vision.mmseg"]
    assert cfg.train_cfg.max_iters == 160000 and cfg.crop_size == (512, 512)
    assert cfg.model.backbone.model_name == name
    assert cfg.optim_wrapper.optimizer.type == "AdamW"
    per_step = cfg.train_dataloader.batch_size * cfg.optim_wrapper.get("accumulative_counts", 1)
    if name.startswith("m2d"):  # the released Mamba2D setting: one GPU, 8 x 2 accumulated, clipping
        assert per_step == 16 and cfg.optim_wrapper.optimizer.weight_decay == 0.05
        assert cfg.optim_wrapper.clip_grad.max_norm == 1.0
    else:  # VMamba's: 4 GPUs x 4
        assert per_step == 4 and cfg.optim_wrapper.optimizer.weight_decay == 0.01
    model_cfg = cfg.model.copy()
    registered = timm.is_model(name)
    if not registered:
        # The model of this config is not in this installation: build the same config on a stand-in.
        probe = SSM2DBackbone(**BACKBONE)
        model_cfg.backbone.update(model_name=BACKBONE["model_name"], out_indices=BACKBONE["out_indices"])
        model_cfg.backbone.pop("drop_path_rate")
        model_cfg.decode_head.in_channels = list(probe.channels)
        model_cfg.auxiliary_head.in_channels = probe.channels[2]
    model = MODELS.build(model_cfg)
    assert list(model.decode_head.in_channels) == list(model.backbone.channels)
    assert model.auxiliary_head.in_channels == model.backbone.channels[2]


def test_config_path_rejects_unknown():
    with pytest.raises(ValueError, match="no shipped config"):
        config_path("resnet50")


def test_released_checkpoint_is_converted_on_load(tmp_path):
    # A checkpoint in the authors' released layout (mmseg: state_dict with backbone.* keys) loads through
    # the converter; the loaded features equal those of the model the checkpoint was made from.
    import timm

    from ssm2d_vision.convert import m2d as conv

    source = timm.create_model("m2d_nano", num_classes=10)
    released = conv.ours_to_released(source.state_dict(), "m2d_nano")
    path = tmp_path / "released.pth"
    torch.save({"state_dict": {k: v for k, v in released.items() if k.startswith("backbone.")}}, path)
    model = SSM2DBackbone(model_name="m2d_nano", out_indices=(0, 1, 2, 3), checkpoint=str(path))
    x = torch.randn(1, 3, 64, 64)
    source.eval()
    model.eval()
    with torch.no_grad():
        expected = source.forward_intermediates(x, intermediates_only=True)
        got = model(x)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
