"""Heatmaps: percentile normalisation, gradient x input against finite differences, the overlay's
registration with the slide, the exports, top-k patches against the slide's pixels, the model card, the
command, and a heatmap on the real H&E slide."""

from __future__ import annotations

import json

import h5py
import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import rankdata

from _slides import cmu_small_region, tissue_image, write_pyramid_tiff
from ssm2d_path.bag import Bag, SlideGrid
from ssm2d_path.cli import main
from ssm2d_path.io import write_trident
from ssm2d_path.models import build_model
from ssm2d_path.models.saved import ModelCardError, load_trained_model, read_model_card, write_model_card
from ssm2d_path.tasks import risk_from_logits
from ssm2d_path.wsi.heatmap import (export_scores, heatmap_slide, heatmap_slides, patch_scores,
                                    percentile_normalise, render_overlay, resolve_methods)
from ssm2d_path.wsi.settings import HeatmapConfig
from ssm2d_path.wsi.slide import open_slide

TINY = {"abmil": {"dim": 8, "attn_dim": 4, "dropout": 0.0},
        "2dmambamil": {"dim": 8, "d_inner": 8, "d_state": 2, "attn_dim": 4, "dropout": 0.0, "backend": "reference"}}


# ------------------------------------------------------------------------------------------ normalisation

def test_percentile_normalise_is_rank_over_n_with_ties_averaged():
    rng = np.random.default_rng(1)
    s = rng.integers(0, 7, size=40).astype(float)  # many ties
    got = percentile_normalise(s)
    np.testing.assert_allclose(got, rankdata(s, method="average") / s.size)
    u = rng.normal(size=25)
    np.testing.assert_allclose(percentile_normalise(u), rankdata(u) / 25)
    assert percentile_normalise(u).max() == 1.0
    with pytest.raises(ValueError, match="NaN"):
        percentile_normalise([1.0, float("nan")])
    with pytest.raises(ValueError, match="1D"):
        percentile_normalise(np.zeros((2, 2)))


def test_resolve_methods():
    assert resolve_methods("auto", "2dmambamil") == ["attention", "gradient"]
    assert resolve_methods("auto", "m2dmil") == ["attention", "gradient"]
    assert resolve_methods("auto", "abmil") == ["attention"]
    assert resolve_methods("both") == ["attention", "gradient"]
    with pytest.raises(ValueError, match="method"):
        resolve_methods("saliency")


# ------------------------------------------------------------------------------------------ gradient x input

def _bag(rng, n_slides=1, dim=5):
    slides = []
    for j in range(n_slides):
        cells = [(r, c) for r in range(3) for c in range(4) if rng.random() < 0.75] or [(0, 0)]
        coords = np.array([[c * 256, r * 256] for r, c in cells])
        f = torch.from_numpy(rng.normal(size=(len(coords), dim)))
        slides.append(SlideGrid.from_coords(f"s{j}", f, coords, 256))
    return Bag("b", slides)


def _target(model, bag, task, loss, cls):
    with torch.no_grad():
        lg = model(bag).logits
    if task == "classification":
        return float(lg[0, cls])
    return float(lg[0, 0]) if loss == "cox" else float(risk_from_logits(lg)[0])


def _finite_difference_contributions(model, bag, task, loss, cls, eps=1e-6):
    """sum_f x_if dT/dx_if = d/dt T(x_i * (1 + t)) at t = 0, by central differences (float64)."""
    out = []
    for j, s in enumerate(bag.slides):
        for i in range(s.num_patches):
            vals = []
            for sign in (1, -1):
                f = s.features.clone()
                f[i] *= 1 + sign * eps
                slides = list(bag.slides)
                slides[j] = SlideGrid(s.slide_id, f, s.coords, s.stride, s.rows, s.cols, s.shape)
                vals.append(_target(model, Bag(bag.bag_id, slides), task, loss, cls))
            out.append((vals[0] - vals[1]) / (2 * eps))
    return np.array(out)


@pytest.mark.parametrize("name", ["abmil", "2dmambamil"])
@pytest.mark.parametrize("task,loss,n_out,target", [("classification", "ce", 3, None), ("classification", "ce", 3, 2),
                                                    ("survival", "nll", 4, None), ("survival", "cox", 1, None)])
def test_gradient_contribution_matches_finite_differences(name, task, loss, n_out, target):
    torch.manual_seed(3)
    rng = np.random.default_rng(4)
    model = build_model(name, 5, n_out, **TINY[name]).double()
    model.train()  # patch_scores must switch to eval itself (no dropout here, but the flag is restored)
    bag = _bag(rng, n_slides=2 if name == "abmil" else 1)
    res = patch_scores(model, bag, method="both", target=target, task=task, loss=loss)
    assert model.training
    model.eval()
    with torch.no_grad():
        out = model(bag)
    cls = None
    if task == "classification":
        cls = int(out.logits.argmax()) if target is None else target
        assert res["target"] == cls
    fd = _finite_difference_contributions(model, bag, task, loss, cls)
    np.testing.assert_allclose(res["gradient"], fd, rtol=1e-5, atol=1e-8)
    assert np.abs(fd).max() > 1e-6  # not trivially zero
    np.testing.assert_allclose(res["attention"], out.scores.numpy(), rtol=0, atol=0)
    np.testing.assert_allclose(res["logits"], out.logits.numpy().ravel())


# ------------------------------------------------------------------------------------------ synthetic slide

@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("slide")
    img, mask = tissue_image(1024, 1536, seed=5)
    path = write_pyramid_tiff(root / "synth.tiff", img, mpp=0.5, levels=3)
    # A 256 px lattice over the cells that are mostly tissue (so some thumbnail pixels have no patch).
    coords = [(x, y) for y in range(0, 1024, 256) for x in range(0, 1536, 256) if mask[y:y + 256, x:x + 256].mean() > 0.3]
    return {"path": path, "img": img, "mask": mask, "coords": np.array(coords, np.int64), "root": root}


def _boxes_independent(coords, d, psl0):
    """Pixels (px, py) whose centre ((p + 0.5) d) lies in [x, x + psl0): px in [ceil(x/d - .5), ceil((x+psl0)/d - .5))."""
    return [(int(np.ceil(x / d - 0.5)), int(np.ceil(y / d - 0.5)), int(np.ceil((x + psl0) / d - 0.5)),
             int(np.ceil((y + psl0) / d - 0.5))) for x, y in coords]


def test_overlay_registers_with_the_patches(synth):
    slide = open_slide(synth["path"])
    thumb, d = slide.thumbnail(8.0)
    assert thumb.shape[:2] == (128, 192) and d == 8.0
    # The thumbnail itself registers with the level-0 picture (block means of 8 x 8 pixels).
    blocks = synth["img"].reshape(128, 8, 192, 8, 3).mean(axis=(1, 3))
    assert np.corrcoef(blocks.ravel(), thumb.astype(float).ravel())[0, 1] > 0.95
    coords = synth["coords"]
    n = len(coords)
    rng = np.random.default_rng(0)
    scores = rng.uniform(0, 0.5, n)
    hot = n // 2
    scores[hot] = 10.0
    v = percentile_normalise(scores)
    cmap = matplotlib.colormaps["jet"]
    top = np.rint(np.array(cmap(1.0)[:3]) * 255)
    over = render_overlay(thumb, d, coords, 256, v, cmap="jet", alpha=1.0)
    boxes = _boxes_independent(coords, d, 256)
    x0, y0, x1, y1 = boxes[hot]
    assert (x1 - x0, y1 - y0) == (32, 32)
    np.testing.assert_array_equal(over[y0:y1, x0:x1], np.broadcast_to(top, (y1 - y0, x1 - x0, 3)))
    covered = np.zeros(thumb.shape[:2], bool)
    for bx0, by0, bx1, by1 in boxes:
        covered[by0:by1, bx0:bx1] = True
    assert (~covered).sum() > 1000
    np.testing.assert_array_equal(over[~covered], thumb[~covered])
    # Each patch's centre pixel maps back (pixel centre * d) into that patch's level-0 square, with its colour.
    for i, (x, y) in enumerate(coords):
        cx, cy = int((x + 128) // d), int((y + 128) // d)
        lx, ly = (cx + 0.5) * d, (cy + 0.5) * d
        owner = [j for j, (a, b) in enumerate(coords) if a <= lx < a + 256 and b <= ly < b + 256]
        assert owner == [i]
        np.testing.assert_array_equal(over[cy, cx], np.rint(np.array(cmap(v[i])[:3]) * 255))
    # alpha blends: (1 - a) * thumb + a * colour on a covered pixel
    half = render_overlay(thumb, d, coords, 256, v, cmap="jet", alpha=0.5)
    exp = np.rint(0.5 * thumb[y0 + 3, x0 + 5] + 0.5 * np.array(cmap(1.0)[:3]) * 255)
    np.testing.assert_allclose(half[y0 + 3, x0 + 5], exp, atol=1)


def test_patch_squares_follow_pixel_centres_brute_force():
    """Off-lattice coordinates and a non-integer downsample: a pixel is painted exactly when its centre
    ((p + 0.5) * d in level-0 px) lies inside a patch's square (checked pixel by pixel)."""
    rng = np.random.default_rng(7)
    thumb = np.full((40, 50, 3), 255, np.uint8)
    d, psl0 = 3.7, 29
    for _ in range(20):
        xy = rng.integers(0, 160, size=(1, 2))
        over = render_overlay(thumb, d, xy, psl0, np.array([1.0]), cmap="jet", alpha=1.0)
        painted = (over != 255).any(axis=2)
        cy, cx = (np.mgrid[0:40, 0:50] + 0.5) * d
        inside = (cx >= xy[0, 0]) & (cx < xy[0, 0] + psl0) & (cy >= xy[0, 1]) & (cy < xy[0, 1] + psl0)
        np.testing.assert_array_equal(painted, inside)


def test_overlapping_patches_are_averaged():
    thumb = np.full((20, 30, 3), 200, np.uint8)
    coords = np.array([[0, 0], [40, 0]])  # level-0 squares of 80 at downsample 4: pixels 0..19 and 10..29
    over = render_overlay(thumb, 4.0, coords, 80, np.array([0.0, 1.0]), cmap="viridis", alpha=1.0)
    cmap = matplotlib.colormaps["viridis"]
    np.testing.assert_array_equal(over[5, 5], np.rint(np.array(cmap(0.0)[:3]) * 255))
    np.testing.assert_array_equal(over[5, 15], np.rint(np.array(cmap(0.5)[:3]) * 255))
    np.testing.assert_array_equal(over[5, 25], np.rint(np.array(cmap(1.0)[:3]) * 255))
    with pytest.raises(ValueError, match="values01"):
        render_overlay(thumb, 4.0, coords, 80, np.array([0.0, 2.0]))


def test_export_scores_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    coords = rng.integers(0, 10000, size=(17, 2))
    scores = {"attention": rng.normal(size=17), "gradient": rng.normal(size=17) * 1e-4}
    csv, h5 = export_scores(tmp_path / "s.csv", tmp_path / "s.h5", coords, scores)
    df = pd.read_csv(csv)
    np.testing.assert_array_equal(df[["x", "y"]].to_numpy(), coords)
    with h5py.File(h5, "r") as f:
        np.testing.assert_array_equal(f["coords"][()], coords)
        for m, s in scores.items():
            np.testing.assert_allclose(df[m].to_numpy(), s, rtol=1e-9)
            np.testing.assert_array_equal(f[m][()], s)
            np.testing.assert_allclose(f[f"{m}_percentile"][()], rankdata(s) / 17)


# ------------------------------------------------------------------------------------------ model card

def _save_model(d, name="abmil", in_dim=8, n_out=2, task="classification", **card_kw):
    torch.manual_seed(0)
    model = build_model(name, in_dim, n_out, **TINY[name])
    d.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), d / "model.pt")
    write_model_card(d, name=name, kwargs=TINY[name], in_dim=in_dim, n_outputs=n_out, task=task, **card_kw)
    return model, d / "model.pt"


def test_model_card_round_trip_and_errors(tmp_path):
    model, ckpt = _save_model(tmp_path / "run", classes=["benign", "tumour"], encoder="resnet50")
    loaded, card = load_trained_model(ckpt)
    assert card["name"] == "abmil" and card["classes"] == ["benign", "tumour"] and card["encoder"] == "resnet50"
    assert card["loss"] == "ce" and not loaded.training
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    bag = _bag(np.random.default_rng(0), dim=8)
    bag = bag.to("cpu", torch.float32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(bag).logits, loaded(bag).logits)
    # errors name the files
    (tmp_path / "bare").mkdir()
    torch.save(model.state_dict(), tmp_path / "bare" / "model.pt")
    with pytest.raises(ModelCardError, match=str(tmp_path / "bare" / "model.json")):
        load_trained_model(tmp_path / "bare" / "model.pt")
    _, wrong = _save_model(tmp_path / "wrong", in_dim=8)
    write_model_card(tmp_path / "wrong", name="abmil", kwargs=TINY["abmil"], in_dim=12, n_outputs=2,
                     task="classification")
    with pytest.raises(ModelCardError, match="model.pt: the weights do not match"):
        load_trained_model(wrong)
    (tmp_path / "wrong" / "model.json").write_text("{not json")
    with pytest.raises(ModelCardError, match="model.json: not a readable JSON"):
        read_model_card(tmp_path / "wrong" / "model.json")
    write_model_card(tmp_path / "wrong", name="nosuchmodel", kwargs={}, in_dim=8, n_outputs=2, task="classification")
    with pytest.raises(ModelCardError, match="nosuchmodel"):
        load_trained_model(wrong)
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        load_trained_model(tmp_path / "run" / "nothere.pt", card=tmp_path / "run" / "model.json")
    with pytest.raises(ValueError, match="task"):
        write_model_card(tmp_path, name="abmil", in_dim=8, n_outputs=2, task="regression")


# ------------------------------------------------------------------------------------------ whole slide

def _features_file(path, coords, dim, *, slide_path, w, h, seed=0):
    feats = np.random.default_rng(seed).normal(size=(len(coords), dim)).astype(np.float32)
    return write_trident(path, feats, coords, patch_size=256, patch_size_level0=256, level0_magnification=20,
                         target_magnification=20, overlap=0, level0_width=w, level0_height=h, encoder="enc",
                         extra_attrs={"slide_path": str(slide_path)})


def test_heatmap_slide_writes_registered_outputs(synth, tmp_path):
    coords = synth["coords"]
    feat = _features_file(tmp_path / "feats" / "synth.h5", coords, 8, slide_path=synth["path"], w=1536, h=1024)
    _, ckpt = _save_model(tmp_path / "model", classes=["a", "b"])
    model, card = load_trained_model(ckpt)
    cfg = HeatmapConfig(method="both", top_k=3, downsample=8.0, alpha=0.5)
    paths = heatmap_slide(feat, model, card, tmp_path / "out", cfg)
    sdir = tmp_path / "out" / "synth"
    for name in ("heatmap_attention.png", "heatmap_gradient.png", "scores.csv", "scores.h5", "heatmap.json"):
        assert (sdir / name).is_file() and sdir / name in paths
    # scores equal the model's own, computed here independently of the pipeline
    grid_f = torch.from_numpy(h5py.File(feat, "r")["features"][()])
    with torch.no_grad():
        att = model(Bag("synth", [SlideGrid.from_coords("synth", grid_f, coords, 256)])).scores.double().numpy()
    df = pd.read_csv(sdir / "scores.csv")
    np.testing.assert_array_equal(df[["x", "y"]].to_numpy(), coords)
    np.testing.assert_allclose(df["attention"].to_numpy(), att, rtol=1e-8)
    with h5py.File(sdir / "scores.h5", "r") as f:
        np.testing.assert_allclose(f["attention"][()], att, rtol=1e-12)
        assert f["gradient"].shape == (len(coords),)
    # top-k: the highest attention patches, pixels equal to the level-0 picture
    tops = sorted((sdir / "top_k").glob("*.png"))
    assert len(tops) == 3
    order = np.argsort(-att)[:3]
    from PIL import Image

    for rank, (p, i) in enumerate(zip(tops, order), 1):
        x, y = coords[i]
        assert p.name.startswith(f"{rank:03d}_") and p.name.endswith(f"_x{x}_y{y}.png")
        np.testing.assert_array_equal(np.asarray(Image.open(p)), synth["img"][y:y + 256, x:x + 256])
    info = json.loads((sdir / "heatmap.json").read_text())
    assert info["methods"] == ["attention", "gradient"] and info["n_patches"] == len(coords)
    assert set(info["prediction"]["probabilities"]) == {"a", "b"}
    png = np.asarray(Image.open(sdir / "heatmap_attention.png").convert("RGB"))
    assert png.shape[0] > 200 and png.shape[1] > 300 and png.std() > 10


def test_heatmap_slides_reports_failures_and_goes_on(synth, tmp_path):
    coords = synth["coords"]
    good = _features_file(tmp_path / "f" / "synth.h5", coords, 8, slide_path="/nowhere/synth.tiff", w=1536, h=1024)
    lost = _features_file(tmp_path / "f" / "lost.h5", coords, 8, slide_path="/nowhere/lost.tiff", w=1536, h=1024)
    wrongdim = _features_file(tmp_path / "g" / "synth.h5", coords, 6, slide_path=synth["path"], w=1536, h=1024)
    empty = _features_file(tmp_path / "e" / "empty.h5", np.zeros((0, 2), np.int64), 8, slide_path=synth["path"],
                           w=1536, h=1024)
    _, ckpt = _save_model(tmp_path / "model")
    model, card = load_trained_model(ckpt)
    cfg = HeatmapConfig(top_k=0, downsample=16.0)
    rep = heatmap_slides([lost, good, empty, wrongdim], model, card, tmp_path / "out", cfg,
                         slides_dir=synth["root"], progress=False)
    assert list(rep.written) == ["synth"]  # found by name in the slides folder
    assert list(rep.skipped) == [str(empty)]
    assert set(rep.failed) == {str(lost), str(wrongdim)}
    assert "lost" in rep.failed[str(lost)] and "not found" in rep.failed[str(lost)]
    assert "dimension 6" in rep.failed[str(wrongdim)] and "in_dim=8" in rep.failed[str(wrongdim)]


def test_heatmap_command(synth, tmp_path, capsys):
    job = tmp_path / "job"
    fdir = job / "20x_256px_0px_overlap" / "features_enc"
    _features_file(fdir / "synth.h5", synth["coords"], 8, slide_path=synth["path"], w=1536, h=1024)
    _, ckpt = _save_model(tmp_path / "run" / "fold_0", name="2dmambamil", encoder="enc")
    rc = main(["heatmap", "--checkpoint", str(ckpt), "--job-dir", str(job), "--no-progress",
               "--set", "heatmap.top_k=2", "--set", "heatmap.downsample=8"])
    out = capsys.readouterr().out
    assert rc == 0, out
    sdir = job / "heatmaps" / "synth"
    assert (sdir / "heatmap_attention.png").is_file() and (sdir / "heatmap_gradient.png").is_file()  # auto: 2D model
    assert len(list((sdir / "top_k").glob("*.png"))) == 2
    assert str(sdir / "heatmap_gradient.png") in out
    rc = main(["heatmap", "--checkpoint", str(tmp_path / "missing" / "model.pt"), "--features", str(fdir)])
    assert rc == 2 and "model.json" in capsys.readouterr().err


def test_heatmap_on_the_real_slide(tmp_path):
    """Every stage on a real H&E slide: a lattice of 256 px patches, a model of the features' dimension, the
    heatmap; the hottest patch's square on the thumbnail carries the top colour."""
    slide = open_slide(cmu_small_region())
    W, H = slide.dimensions
    coords = np.array([(x, y) for y in range(0, H - 255, 256) for x in range(0, W - 255, 256)], np.int64)
    feat = _features_file(tmp_path / "f" / "cmu_small_region.h5", coords, 32, slide_path=slide.path, w=W, h=H)
    _, ckpt = _save_model(tmp_path / "m", in_dim=32)
    model, card = load_trained_model(ckpt)
    cfg = HeatmapConfig(method="attention", top_k=1, alpha=1.0, thumbnail_max_side=1024)
    heatmap_slide(feat, model, card, tmp_path / "out", cfg)
    sdir = tmp_path / "out" / "cmu_small_region"
    df = pd.read_csv(sdir / "scores.csv")
    hot = int(df["attention"].to_numpy().argmax())
    x, y = coords[hot]
    thumb, d = slide.thumbnail(None, max_side=1024)
    over = render_overlay(thumb, d, coords, 256, df["attention_percentile"].to_numpy(), cmap="jet", alpha=1.0)
    cy, cx = int((y + 128) / d), int((x + 128) / d)
    np.testing.assert_array_equal(over[cy, cx], np.rint(np.array(matplotlib.colormaps["jet"](1.0)[:3]) * 255))
    top = next((sdir / "top_k").glob("001_*.png"))
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(top)), slide.read_region((int(x), int(y)), 0, (256, 256)))


def test_heatmap_slide_survival_model(synth, tmp_path):
    coords = synth["coords"]
    feat = _features_file(tmp_path / "f" / "synth.h5", coords, 8, slide_path=synth["path"], w=1536, h=1024, seed=3)
    _, ckpt = _save_model(tmp_path / "m", n_out=4, task="survival", n_bins=4)
    model, card = load_trained_model(ckpt)
    assert card["loss"] == "nll"
    heatmap_slide(feat, model, card, tmp_path / "out", HeatmapConfig(method="gradient", top_k=1, downsample=16.0))
    sdir = tmp_path / "out" / "synth"
    bag = Bag("synth", [SlideGrid.from_coords("synth", torch.from_numpy(h5py.File(feat, "r")["features"][()]), coords, 256)])
    with torch.no_grad():
        risk = float(risk_from_logits(model(bag).logits.double())[0])
    info = json.loads((sdir / "heatmap.json").read_text())
    assert info["prediction"]["risk"] == pytest.approx(risk, rel=1e-6)
    assert info["methods"] == ["gradient"] and (sdir / "heatmap_gradient.png").is_file()
    assert not (sdir / "heatmap_attention.png").exists()
    g = pd.read_csv(sdir / "scores.csv")["gradient"].to_numpy()
    top = next((sdir / "top_k").glob("001_*.png"))
    x, y = coords[int(np.argmax(g))]
    assert top.name.endswith(f"_x{x}_y{y}.png")
