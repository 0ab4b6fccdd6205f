"""UperNet / FCN heads against mmseg's (float64, same weights), SegModel shapes and loss, metrics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssm2d_vision.seg import (FCNHead, SegModel, UperNetHead, confusion_matrix, convert_mmseg_head_state_dict,
                              kmeans_mask, mean_iou)
from ssm2d_vision.seg.sample import rgb_to_lab

# The backbone the tests build (switch to dict(model_name="m2d_nano", out_indices=(0, 1, 2, 3))).
BACKBONE = dict(model_name="m2d_nano", out_indices=(0, 1, 2, 3))


def _randomise(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Every parameter and BN statistic random (BN far from identity), so a wrong mapping shows."""
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen, dtype=t.dtype) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=gen, dtype=t.dtype) * 0.3)


def _features(gen, channels, sizes, batch=2):
    return [torch.randn(batch, c, *s, generator=gen, dtype=torch.float64) for c, s in zip(channels, sizes)]


@pytest.fixture(scope="module")
def mmseg_models():
    pytest.importorskip("mmseg", reason="mmsegmentation not installed (pip install 'ssm2d-vision[mmseg]')")
    import ssm2d_vision.mmseg  # noqa: F401
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    init_default_scope("mmseg")
    return MODELS


@pytest.mark.parametrize("training", [False, True])
def test_upernet_matches_mmseg_upperhead(mmseg_models, training):
    gen = torch.Generator().manual_seed(1)
    in_channels, channels, k = [8, 12, 16, 24], 16, 5
    # Odd sizes (not exact halvings) exercise every bilinear resize path.
    sizes = [(17, 13), (9, 7), (5, 4), (3, 2)]
    ref = mmseg_models.build(dict(
        type="UPerHead", in_channels=in_channels, in_index=[0, 1, 2, 3], pool_scales=(1, 2, 3, 6),
        channels=channels, dropout_ratio=0.0, num_classes=k, norm_cfg=dict(type="BN", requires_grad=True),
        align_corners=False)).double()
    _randomise(ref, gen)
    ours = UperNetHead(in_channels, k, channels=channels, dropout=0.0).double()
    ours.load_state_dict(convert_mmseg_head_state_dict(ref.state_dict()), strict=True)
    ref.train(training)
    ours.train(training)
    feats = _features(gen, in_channels, sizes)
    expected = ref([f.clone() for f in feats])
    got = ours(feats)
    assert got.shape == (2, k, 17, 13)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_fcn_aux_head_matches_mmseg(mmseg_models):
    gen = torch.Generator().manual_seed(2)
    ref = mmseg_models.build(dict(
        type="FCNHead", in_channels=12, in_index=2, channels=10, num_convs=1, concat_input=False,
        dropout_ratio=0.0, num_classes=4, norm_cfg=dict(type="BN", requires_grad=True),
        align_corners=False)).double().eval()
    _randomise(ref, gen)
    ours = FCNHead(12, 4, channels=10, dropout=0.0, in_index=2).double().eval()
    ours.load_state_dict(convert_mmseg_head_state_dict(ref.state_dict()), strict=True)
    feats = _features(gen, [4, 8, 12, 16], [(16, 16), (8, 8), (6, 5), (3, 3)])
    torch.testing.assert_close(ours(feats), ref(feats), rtol=1e-10, atol=1e-10)


def test_segmodel_shapes_train_and_eval():
    torch.manual_seed(0)
    model = SegModel.from_timm(BACKBONE["model_name"], 7, out_indices=BACKBONE["out_indices"], channels=32,
                               aux_channels=16)
    x = torch.randn(2, 3, 64, 96)
    model.train()
    logits, aux = model(x)
    assert logits.shape == aux.shape == (2, 7, 64, 96)
    model.eval()
    out = model(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 7, 64, 96)
    pred = model.predict(x)
    assert pred.shape == (2, 64, 96) and pred.dtype == torch.int64 and not model.training
    assert torch.equal(pred, out.argmax(1))


def test_loss_is_masked_mean_cross_entropy_plus_weighted_aux():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 5, 6, generator=gen, dtype=torch.float64)
    aux = torch.randn(2, 4, 5, 6, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 4, (2, 5, 6), generator=gen)
    target[0, :2] = 255
    model = SegModel(torch.nn.Identity(), torch.nn.Identity(), aux_weight=0.4)

    def hand_ce(lg):  # -log softmax at the label, averaged over labelled pixels only
        logp = lg - lg.exp().sum(1, keepdim=True).log()
        total, count = 0.0, 0
        for b in range(2):
            for i in range(5):
                for j in range(6):
                    t = int(target[b, i, j])
                    if t != 255:
                        total -= float(logp[b, t, i, j])
                        count += 1
        return total / count

    out = model.loss((logits, aux), target)
    assert out["loss_decode"].item() == pytest.approx(hand_ce(logits), rel=1e-12)
    assert out["loss_aux"].item() == pytest.approx(hand_ce(aux), rel=1e-12)
    assert out["loss"].item() == pytest.approx(hand_ce(logits) + 0.4 * hand_ce(aux), rel=1e-12)
    assert set(model.loss(logits, target)) == {"loss", "loss_decode"}


def test_bad_inputs_raise():
    head = UperNetHead([4, 8], 3, channels=8)
    with pytest.raises(ValueError, match="expects 2 feature maps"):
        head([torch.randn(1, 4, 8, 8)])
    with pytest.raises(ValueError, match=r"feature 1 must be \(B, 8, H, W\)"):
        head([torch.randn(1, 4, 8, 8), torch.randn(1, 5, 4, 4)])
    with pytest.raises(ValueError, match="num_classes"):
        UperNetHead([4, 8], 0)
    with pytest.raises(ValueError, match="name: timm has no model"):
        SegModel.from_timm("no_such_model_xyz", 3)
    model = SegModel(torch.nn.Identity(), torch.nn.Identity())
    with pytest.raises(ValueError, match="target must be"):
        model.loss(torch.randn(1, 3, 4, 4), torch.zeros(1, 4, 5, dtype=torch.long))


def test_mean_iou_against_hand_count():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 1]])
    cm = confusion_matrix(pred, target, 3)
    # rows target, columns prediction; the ignored pixel is not counted
    assert cm.tolist() == [[1, 1, 0], [0, 3, 0], [1, 0, 1]]
    # IoU: class 0: 1 / (2 + 2 - 1) = 1/3, class 1: 3 / (3 + 4 - 3) = 3/4, class 2: 1 / (2 + 1 - 1) = 1/2
    assert mean_iou(pred, target, 3) == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)


def test_rgb_to_lab_reference_colours():
    # CIE Lab (D65) of sRGB white, black, red and mid grey from the standard conversion tables.
    rgb = torch.tensor([[1.0, 0.0, 1.0, 0.5], [1.0, 0.0, 0.0, 0.5], [1.0, 0.0, 0.0, 0.5]]).view(3, 1, 4)
    lab = rgb_to_lab(rgb)[:, 0].T
    expected = torch.tensor([[100.0, 0.0, 0.0], [0.0, 0.0, 0.0], [53.24, 80.09, 67.20], [53.39, 0.0, 0.0]])
    torch.testing.assert_close(lab, expected, atol=0.02, rtol=0)


def test_kmeans_mask_recovers_colour_blocks():
    gen = torch.Generator().manual_seed(4)
    colours = torch.tensor([[0.9, 0.9, 0.8], [0.1, 0.1, 0.2], [0.8, 0.1, 0.1]])
    truth = torch.randint(0, 3, (20, 24), generator=gen)
    image = (colours[truth].permute(2, 0, 1) + 0.02 * torch.randn(3, 20, 24, generator=gen)).clamp(0, 1)
    labels = kmeans_mask(image, 3)
    # ordered dark to light: black-ish (1) -> 0, red (2) -> 1, white-ish (0) -> 2
    assert torch.equal(labels, torch.tensor([2, 0, 1])[truth])
