"""mmsegmentation end to end on the CPU: UperNet + FCN aux on an ssm2d-vision backbone from a
shipped config; forward/loss/backward/predict, a short Runner training on a synthetic ADE20K-layout
data set with IoUMetric validation, and a resume from the saved checkpoint."""

from __future__ import annotations


import numpy as np
import pytest
import torch

pytest.importorskip("mmseg", reason="mmsegmentation not installed (pip install 'ssm2d-vision[mmseg]')")

import ssm2d_vision.mmseg  # noqa: E402,F401  (mmcv.ops stand-in where needed, SSM2DBackbone registration)
from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmengine.runner import Runner  # noqa: E402
from mmseg.registry import MODELS  # noqa: E402

# The backbone under test (switch to e.g. dict(model_name="m2d_nano", out_indices=(0, 1, 2, 3)),
# adding model arguments that make it small if it is too slow on the CPU).
BACKBONE = dict(model_name="m2d_nano", out_indices=(0, 1, 2, 3))
SHIPPED_CONFIG = "m2d_nano"  # its optimiser setting (gradient accumulation, clipping) is exercised too

NUM_IMAGES, IMAGE_HW, CROP = 4, (64, 96), (64, 64)
LABELS = (1, 2, 3)  # ADE20K annotation values (0 = unlabelled, reduced to 255)


def _write_ade20k(root) -> None:
    """images/{training,validation}/*.jpg + annotations/.../*.png: blocks of label colour."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(NUM_IMAGES if split == "training" else 2):
            seg = np.zeros(IMAGE_HW, np.uint8)
            for label in LABELS:
                y, x = rng.integers(0, IMAGE_HW[0] - 16), rng.integers(0, IMAGE_HW[1] - 16)
                seg[y:y + 32, x:x + 32] = label
            colours = np.array([[0, 0, 0], [200, 40, 40], [40, 200, 40], [40, 40, 200]], np.float64)
            img = np.clip(colours[seg] + rng.normal(0, 20, (*IMAGE_HW, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / "images" / split / f"ADE_{split}_{i:08d}.jpg")
            Image.fromarray(seg).save(root / "annotations" / split / f"ADE_{split}_{i:08d}.png")


def _derived_config(data_root, work_dir, max_iters: int) -> Config:
    """The shipped config, made tiny: the test backbone, narrow heads, 64x64 crops, 2 images per batch."""
    from ssm2d_vision.mmseg import SSM2DBackbone, config_path

    cfg = Config.fromfile(str(config_path(SHIPPED_CONFIG)))
    channels = SSM2DBackbone(**BACKBONE).channels
    cfg.model.backbone.update(BACKBONE)
    cfg.model.backbone.pop("drop_path_rate")
    cfg.model.data_preprocessor.size = CROP
    cfg.model.decode_head.update(in_channels=list(channels), channels=32)
    cfg.model.auxiliary_head.update(in_channels=channels[2], channels=16)
    cfg.train_pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="LoadAnnotations", reduce_zero_label=True),
        dict(type="RandomCrop", crop_size=CROP, cat_max_ratio=0.75),
        dict(type="RandomFlip", prob=0.5),
        dict(type="PhotoMetricDistortion"),
        dict(type="PackSegInputs"),
    ]
    cfg.test_pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="LoadAnnotations", reduce_zero_label=True),
        dict(type="PackSegInputs"),
    ]
    for loader, pipeline, batch in ((cfg.train_dataloader, cfg.train_pipeline, 2),
                                    (cfg.val_dataloader, cfg.test_pipeline, 1)):
        loader.update(batch_size=batch, num_workers=0, persistent_workers=False)
        loader.dataset.update(data_root=str(data_root), pipeline=pipeline)
    cfg.test_dataloader = cfg.val_dataloader
    cfg.optim_wrapper.optimizer.lr = 1e-3
    cfg.param_scheduler = [
        dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0, end=2),
        dict(type="PolyLR", eta_min=0.0, power=1.0, begin=2, end=8, by_epoch=False),
    ]
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=max_iters, val_interval=4)
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", by_epoch=False, interval=4)
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=1, log_metric_by_epoch=False)
    cfg.env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
                       dist_cfg=dict(backend="gloo"))
    cfg.visualizer = dict(type="SegLocalVisualizer", vis_backends=[dict(type="LocalVisBackend")], name="vis")
    cfg.work_dir = str(work_dir)
    cfg.randomness = dict(seed=0)
    return cfg


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ade") / "ADEChallengeData2016"
    _write_ade20k(root)
    return root


def test_encoder_decoder_forward_loss_backward_predict(data_root, tmp_path):
    from mmengine.model import revert_sync_batchnorm
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    init_default_scope("mmseg")
    cfg = _derived_config(data_root, tmp_path, max_iters=4)
    model = revert_sync_batchnorm(MODELS.build(cfg.model))  # not distributed: plain BN
    model.init_weights()
    torch.manual_seed(0)
    inputs = torch.randn(2, 3, 64, 64)
    samples = []
    for _ in range(2):
        s = SegDataSample()
        s.gt_sem_seg = PixelData(data=torch.randint(0, 150, (1, 64, 64)))
        s.set_metainfo(dict(img_shape=(64, 64), ori_shape=(64, 64), pad_shape=(64, 64)))
        samples.append(s)
    model.train()
    losses = model.loss(inputs, samples)
    assert {"decode.loss_ce", "aux.loss_ce"} <= set(losses)
    total = sum(v for k, v in losses.items() if "loss" in k)
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    model.eval()
    with torch.no_grad():
        logits = model(inputs, mode="tensor")
        preds = model.predict(inputs, samples)
    assert logits.shape[:2] == (2, 150)
    assert preds[0].pred_sem_seg.data.shape == (1, 64, 64)


def test_runner_trains_validates_and_resumes(data_root, tmp_path, monkeypatch):
    # mmengine's checkpoints hold more than tensors: torch >= 2.6 loads them only with this set.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    work = tmp_path / "work"
    runner = Runner.from_cfg(_derived_config(data_root, work, max_iters=4))
    before = {k: v.detach().clone() for k, v in runner.model.backbone.state_dict().items()}
    metrics = {}

    orig_evaluate = runner.val_loop.evaluator.evaluate

    def recording_evaluate(size):
        metrics.update(orig_evaluate(size))
        return metrics

    runner.val_loop.evaluator.evaluate = recording_evaluate
    runner.train()
    assert runner.iter == 4
    # validation ran at iteration 4 and produced mIoU
    assert "mIoU" in metrics and np.isfinite(metrics["mIoU"])
    losses = np.asarray(runner.message_hub.get_scalar("train/loss").data[0])
    assert losses.size == 4 and np.isfinite(losses).all()
    after = runner.model.backbone.state_dict()
    changed = [k for k, v in after.items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert changed, "training changed no backbone tensor"
    ckpt = work / "iter_4.pth"
    assert ckpt.is_file()

    cfg = _derived_config(data_root, work, max_iters=6)
    cfg.resume, cfg.load_from = True, str(ckpt)
    resumed = Runner.from_cfg(cfg)
    resumed.train()
    assert resumed.iter == 6
    # the resumed run started from the saved weights, not from a fresh initialisation
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    start = {k: v for k, v in saved.items() if k.startswith("backbone.")}
    assert start and all(torch.equal(after[k[len("backbone."):]], v) for k, v in start.items())
    assert not all(torch.equal(resumed.model.backbone.state_dict()[k[len("backbone."):]], v)
                   for k, v in start.items() if v.is_floating_point())
