"""SegModel learns a real photograph's colour-cluster segmentation in a few CPU steps."""

from __future__ import annotations

import time

import torch

from ssm2d_vision.seg import SegModel, kmeans_mask, load_sample_image, mean_iou

# The backbone the test trains (switch to dict(model_name="m2d_nano", out_indices=(0, 1, 2, 3))).
BACKBONE = dict(model_name="m2d_nano", out_indices=(0, 1, 2, 3))

NUM_CLASSES = 4
STEPS = 30
CROP = 64
BATCH = 4
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def _random_batch(image, mask, gen):
    """BATCH random CROP x CROP crops, each flipped left-right with probability 1/2."""
    _, h, w = image.shape
    xs, ys = [], []
    for _ in range(BATCH):
        i = int(torch.randint(0, h - CROP + 1, (1,), generator=gen))
        j = int(torch.randint(0, w - CROP + 1, (1,), generator=gen))
        x, y = image[:, i:i + CROP, j:j + CROP], mask[i:i + CROP, j:j + CROP]
        if torch.rand((), generator=gen) < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        xs.append(x)
        ys.append(y)
    return torch.stack(xs), torch.stack(ys)


def test_training_on_a_real_image_lowers_loss_and_beats_constant():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    image = load_sample_image()  # (3, 150, 128)
    mask = kmeans_mask(image, NUM_CLASSES)
    assert image.shape == (3, 150, 128) and mask.shape == (150, 128)
    image = (image - MEAN) / STD
    model = SegModel.from_timm(BACKBONE["model_name"], NUM_CLASSES, out_indices=BACKBONE["out_indices"],
                               channels=64, aux_channels=32)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    losses = []
    t0 = time.perf_counter()
    model.train()
    for _ in range(STEPS):
        x, y = _random_batch(image, mask, gen)
        loss = model.loss(model(x), y)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    elapsed = time.perf_counter() - t0
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert all(torch.isfinite(torch.tensor(losses)))
    assert last < 0.7 * first, f"loss did not fall clearly: first-5 mean {first:.3f}, last-5 {last:.3f}"

    # Evaluate on the central 128 x 128 square (a multiple of 32, which every backbone accepts).
    top = (150 - 128) // 2
    x_eval, y_eval = image[None, :, top:top + 128], mask[None, top:top + 128]
    pred = model.predict(x_eval)
    counts = torch.bincount(y_eval.flatten(), minlength=NUM_CLASSES)
    constant = torch.full_like(y_eval, int(counts.argmax()))
    miou, miou_constant = mean_iou(pred, y_eval, NUM_CLASSES), mean_iou(constant, y_eval, NUM_CLASSES)
    assert miou > miou_constant + 0.1, f"mIoU {miou:.3f} vs constant predictor {miou_constant:.3f}"
    print(f"{STEPS} steps in {elapsed:.1f} s, loss {first:.3f} -> {last:.3f}, mIoU {miou:.3f} "
          f"(constant {miou_constant:.3f})")
