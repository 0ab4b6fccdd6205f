"""Tissue detection, patch grids and the ``ssm2d-path patch`` command, on synthetic pyramidal TIFFs whose
true tissue mask is known (tests/_slides.py) and on one real H&E slide."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from _slides import cmu_small_region, tissue_image, write_pyramid_tiff
from ssm2d_path import cli
from ssm2d_path.bag import grid_indices
from ssm2d_path.wsi import MissingMPPError, SlideReadError, open_slide, read_coords
from ssm2d_path.wsi.patching import (CONTOUR_RGB, draw_visualization, find_slides, grid_from_mask, patch_slides,
                                     plan_patches, tissue_fractions, visualization_path)
from ssm2d_path.wsi.settings import PatchConfig, SlidesConfig
from ssm2d_path.wsi.tissue import detect_tissue, otsu_threshold

SIZE = 2048  # level-0 side of the synthetic slides: 1024 um at 0.5 um/px
SMALL_HOLE = (0.35, 0.3, 0.05)  # radius 51 um at 0.5 um/px: 8.2e3 um^2 < min_hole_um2 (2e4): filled
BIG_HOLE = (0.6, 0.7, 0.12)  # radius 123 um: 4.7e4 um^2: kept
SPECK = (0.1, 0.8, 0.02)  # radius 20 um: 1.3e3 um^2 < min_fragment_um2 (5e4): removed
DARK_BAND = 60  # level-0 columns of near-black scanner border on the left


@pytest.fixture(scope="module")
def synthetic():
    img, mask = tissue_image(SIZE, SIZE, seed=3, holes=[SMALL_HOLE, BIG_HOLE], specks=[SPECK])
    rng = np.random.default_rng(0)
    img[:, :DARK_BAND] = np.clip(rng.normal(14, 8, (SIZE, DARK_BAND, 3)), 0, 255).astype(np.uint8)
    return img, mask


@pytest.fixture(scope="module")
def slides(tmp_path_factory, synthetic):
    """The synthetic picture as a 20x-like (0.5 um/px) and a 40x-like (0.25 um/px) 3-level pyramid."""
    d = tmp_path_factory.mktemp("slides")
    img, _ = synthetic
    return {"20x": write_pyramid_tiff(d / "s20.tiff", img, mpp=0.5, levels=3),
            "40x": write_pyramid_tiff(d / "s40.tiff", img, mpp=0.25, levels=3)}


def _block_mean(mask: np.ndarray, k: int) -> np.ndarray:
    h, w = mask.shape[0] // k, mask.shape[1] // k
    return mask[:h * k, :w * k].reshape(h, k, w, k).mean(axis=(1, 3))


def _at(mask: np.ndarray, cy: float, cx: float) -> bool:
    return bool(mask[int(cy * mask.shape[0]), int(cx * mask.shape[1])])


# -- tissue detection ----------------------------------------------------------------------------


def test_otsu_matches_exhaustive_search():
    rng = np.random.default_rng(1)
    v = np.concatenate([rng.normal(30, 10, 3000), rng.normal(140, 25, 1000)]).clip(0, 255).round()
    best, best_t = -1.0, None
    for t in range(1, 256):  # classes v < t and v >= t, variances from the raw values in float64
        lo, hi = v[v < t], v[v >= t]
        if lo.size == 0 or hi.size == 0:
            continue
        b = lo.size * hi.size / v.size ** 2 * (lo.mean() - hi.mean()) ** 2
        if b > best + 1e-12:
            best, best_t = b, t
    assert otsu_threshold(v) == best_t


def test_tissue_mask_matches_truth(slides, synthetic):
    _, truth = synthetic
    cfg = PatchConfig(tissue_mpp=4.0)
    slide = open_slide(slides["20x"])
    rgb, ds = slide.thumbnail(downsample=cfg.tissue_mpp / slide.mpp)
    assert ds == 8.0 and rgb.shape[:2] == (SIZE // 8, SIZE // 8)
    mask = detect_tissue(rgb, cfg.tissue_mpp, cfg)
    want = _block_mean(truth, 8) >= 0.5
    # What the detector must change: the small hole filled, the speck removed.
    rr, cc = np.mgrid[0:want.shape[0], 0:want.shape[1]]
    n = want.shape[0]
    for cy, cx, r in (SMALL_HOLE,):
        want |= (rr + 0.5 - cy * n) ** 2 + (cc + 0.5 - cx * n) ** 2 <= (r * n) ** 2
    cy, cx, r = SPECK
    want &= (rr + 0.5 - cy * n) ** 2 + (cc + 0.5 - cx * n) ** 2 > ((r + 0.01) * n) ** 2
    iou = (mask & want).sum() / (mask | want).sum()
    assert iou > 0.95, iou
    assert _at(mask, *SMALL_HOLE[:2]) and not _at(mask, *BIG_HOLE[:2]) and not _at(mask, *SPECK[:2])
    assert not mask[:, : DARK_BAND // 8].any(), "near-black scanner border taken for tissue"


def test_tissue_size_thresholds_are_physical(slides):
    slide = open_slide(slides["20x"])
    rgb, ds = slide.thumbnail(downsample=8.0)
    keep_all = PatchConfig(tissue_mpp=4.0, min_hole_um2=1000.0, min_fragment_um2=500.0, open_um=8.0, median_um=12.0)
    mask = detect_tissue(rgb, slide.mpp * ds, keep_all)
    assert not _at(mask, *SMALL_HOLE[:2]) and not _at(mask, *BIG_HOLE[:2]), "holes above min_hole_um2 are kept"
    assert _at(mask, *SPECK[:2]), "a fragment above min_fragment_um2 is kept"
    fill_all = PatchConfig(tissue_mpp=4.0, min_hole_um2=1e5)
    mask = detect_tissue(rgb, slide.mpp * ds, fill_all)
    assert _at(mask, *SMALL_HOLE[:2]) and _at(mask, *BIG_HOLE[:2])
    # The same picture at half the resolution gives the same decisions (areas are in um^2).
    half = rgb[::2, ::2].copy()
    m2 = detect_tissue(half, slide.mpp * ds * 2, PatchConfig(tissue_mpp=8.0))
    assert _at(m2, *SMALL_HOLE[:2]) and not _at(m2, *BIG_HOLE[:2]) and not _at(m2, *SPECK[:2])


def test_tissue_at_the_picture_edge_is_kept():
    img, truth = tissue_image(512, 512, seed=5, ellipses=[(0.5, 0.0, 0.3, 0.25), (0.0, 0.6, 0.2, 0.2)])
    mask = detect_tissue(img[::4, ::4].copy(), 8.0, PatchConfig())
    want = _block_mean(truth, 4) >= 0.5
    assert mask[:, 0].sum() >= want[:, 0].sum() - 2 and mask[0].sum() >= want[0].sum() - 2
    assert (mask & want).sum() / (mask | want).sum() > 0.9


def test_all_glass_has_no_tissue():
    img, mask = tissue_image(512, 512, ellipses=[])
    assert not mask.any()
    assert not detect_tissue(img[::4, ::4].copy(), 8.0, PatchConfig()).any()


def test_detect_tissue_rejects_bad_input():
    with pytest.raises(ValueError, match="rgb"):
        detect_tissue(np.zeros((8, 8), np.uint8), 8.0)
    with pytest.raises(ValueError, match="mpp"):
        detect_tissue(np.zeros((8, 8, 3), np.uint8), 0.0)


# -- the grid ------------------------------------------------------------------------------------


def _fractions_by_overlap(mask, W0, H0, xs, ys, size):
    """Tissue fraction of each level-0 square by summing, over mask pixels, the area each one shares
    with the square (mask pixel (i, j) covers level-0 [j W0/w, (j+1) W0/w) x [i H0/h, (i+1) H0/h))."""
    h, w = mask.shape
    px, py = W0 / w, H0 / h
    out = np.zeros((len(ys), len(xs)))
    for a, y in enumerate(ys):
        oy = np.clip(np.minimum((np.arange(h) + 1) * py, y + size) - np.maximum(np.arange(h) * py, y), 0, None)
        for b, x in enumerate(xs):
            ox = np.clip(np.minimum((np.arange(w) + 1) * px, x + size) - np.maximum(np.arange(w) * px, x), 0, None)
            out[a, b] = (mask * oy[:, None] * ox[None, :]).sum() / size ** 2
    return out


@pytest.mark.parametrize("W0,H0", [(360, 296), (353, 290)])  # integer and fractional level-0 px per mask px
def test_tissue_fractions_are_exact(W0, H0):
    rng = np.random.default_rng(W0)
    mask = rng.random((37, 45)) < 0.4
    xs, ys = np.arange(3, 300, 29), np.arange(0, 240, 31)
    got = tissue_fractions(mask, (45 / W0, 37 / H0), xs, ys, 41)
    np.testing.assert_allclose(got, _fractions_by_overlap(mask, W0, H0, xs, ys, 41), atol=1e-9)


def test_grid_from_mask_vs_brute_force():
    rng = np.random.default_rng(7)
    from scipy import ndimage as ndi

    mask = ndi.gaussian_filter(rng.random((40, 52)), 2.0) > 0.52
    mask[:3] = False
    mask[:, :5] = False
    k, size, stride, min_t = 8, 40, 28, 0.3
    W0, H0 = 52 * k, 40 * k
    got = grid_from_mask(mask, (W0, H0), size, stride, min_t)
    level0 = np.kron(mask, np.ones((k, k), bool))
    ys, xs = np.nonzero(level0)
    want = []
    for y in range(ys.min(), ys.max() + 1, stride):
        for x in range(xs.min(), xs.max() + 1, stride):
            if x + size <= W0 and y + size <= H0 and level0[y:y + size, x:x + size].sum() >= min_t * size * size:
                want.append((x, y))
    assert len(want) > 10
    np.testing.assert_array_equal(got, np.asarray(want, np.int64))  # the same cells, in raster order


def test_plan_grid_follows_true_tissue(slides, synthetic):
    truth = _expected_mask(synthetic[1])
    cfg = PatchConfig(target_magnification=20, patch_size=128, min_tissue=0.4)
    plan = plan_patches(open_slide(slides["20x"]), cfg)
    g = plan.grid
    assert (g.patch_size_level0, g.stride_level0, g.read_level) == (128, 128, 0)
    c = g.coords
    assert len(c) > 20
    assert np.array_equal(np.lexsort((c[:, 0], c[:, 1])), np.arange(len(c))), "coords not in raster order"
    assert (c >= 0).all() and (c[:, 0] + 128 <= SIZE).all() and (c[:, 1] + 128 <= SIZE).all()
    ox, oy = c.min(axis=0)
    assert ((c - [ox, oy]) % 128 == 0).all()
    kept = {tuple(p) for p in c.tolist()}
    # Every lattice cell: clearly tissue -> kept, clearly not -> dropped (the border band is left to the mask).
    wrong = []
    for y in range(oy, SIZE - 127, 128):
        for x in range(ox, SIZE - 127, 128):
            f = truth[y:y + 128, x:x + 128].mean()
            if (f >= 0.4 + 0.12 and (x, y) not in kept) or (f <= 0.4 - 0.12 and (x, y) in kept):
                wrong.append((x, y, round(f, 3)))
    assert not wrong, wrong
    # The lattice starts at the tissue's bounding box (the speck is removed, so without it).
    tys, txs = np.nonzero(truth)
    assert abs(ox - txs.min()) <= 16 and abs(oy - tys.min()) <= 16


def _expected_mask(truth):
    """The true level-0 mask as the detector should see it: the small hole filled, the speck removed."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    cy, cx, r = SMALL_HOLE
    out = truth | ((yy - cy * SIZE) ** 2 + (xx - cx * SIZE) ** 2 <= (r * SIZE) ** 2)
    cy, cx, r = SPECK
    return out & ~((yy - cy * SIZE) ** 2 + (xx - cx * SIZE) ** 2 <= ((r + 0.005) * SIZE) ** 2)


@pytest.mark.parametrize("kw,want20,want40", [
    ({"target_magnification": 20, "patch_size": 256}, (256, 256, 0), (512, 512, 1)),
    ({"target_magnification": 20, "patch_size": 256, "overlap": 64}, (256, 192, 0), (512, 384, 1)),
    ({"target_mpp": 1.0, "patch_size": 224}, (448, 448, 1), (896, 896, 2)),
    ({"target_magnification": 5, "patch_size": 256, "overlap": 32}, (1024, 896, 2), (2048, 1792, 2)),
])
def test_level0_geometry_per_slide(slides, kw, want20, want40):
    cfg = PatchConfig(min_tissue=0.1, **kw)
    for key, want in (("20x", want20), ("40x", want40)):
        g = plan_patches(open_slide(slides[key]), cfg).grid
        assert (g.patch_size_level0, g.stride_level0, g.read_level) == want, key
        if g.num_patches > 1:
            grid_indices(g.coords, g.stride_level0)  # on the lattice, one patch per cell
    if "target_mpp" in kw:
        assert g.target_mpp == kw["target_mpp"] and g.target_magnification == pytest.approx(10 / kw["target_mpp"])
    else:
        assert g.target_magnification == kw["target_magnification"]


def test_upsampling_is_refused(slides):
    slide = open_slide(slides["20x"])
    with pytest.raises(ValueError, match=r"s20\.tiff.*40x.*20x"):
        plan_patches(slide, PatchConfig(target_magnification=40))
    with pytest.raises(ValueError, match=r"0\.3 um/px.*0\.5 um/px"):
        plan_patches(slide, PatchConfig(target_mpp=0.3))
    assert plan_patches(slide, PatchConfig(target_magnification=21)).grid.patch_size_level0 == 244


# -- files and batches ---------------------------------------------------------------------------


def test_written_file_is_readable(slides, tmp_path):
    cfg = PatchConfig(target_magnification=10, patch_size=128, overlap=32, thumbnail_max_side=256)
    rep = patch_slides([slides["40x"]], tmp_path, cfg, progress=False)
    out = rep.written[Path(slides["40x"])]
    assert out == tmp_path / "10x_128px_32px_overlap" / "patches" / "s40_patches.h5"
    g = read_coords(out)
    want = plan_patches(open_slide(slides["40x"]), cfg).grid
    np.testing.assert_array_equal(g.coords, want.coords)
    assert (g.patch_size, g.patch_size_level0, g.stride_level0, g.overlap) == (128, 512, 384, 32)
    assert (g.mpp, g.target_mpp, g.level0_magnification, g.target_magnification) == (0.25, 1.0, 40.0, 10.0)
    assert (g.level0_width, g.level0_height, g.read_level, g.name) == (SIZE, SIZE, 2, "s40")
    assert g.slide_path == str(Path(slides["40x"]).resolve())
    assert g.attrs["tissue_mpp"] == 8.0 and g.attrs["ssm2d_path_version"] and g.attrs["mpp_source"] == "file"
    with h5py.File(out, "r") as f:
        assert f["coords"].dtype == np.int64
        for k in ("patch_size", "patch_size_level0", "level0_magnification", "target_magnification", "overlap",
                  "level0_width", "level0_height", "name"):
            assert k in f["coords"].attrs, k
    rows, cols, shape = grid_indices(g.coords, g.stride_level0)
    assert len(rows) == g.num_patches and shape[0] * shape[1] >= g.num_patches


def test_slide_without_mpp(tmp_path, synthetic):
    img, _ = synthetic
    p = write_pyramid_tiff(tmp_path / "nompp.tiff", img[:1024, :1024], mpp=None, levels=2)
    with pytest.raises(MissingMPPError, match=r"nompp\.tiff.*slides\.mpp"):
        plan_patches(open_slide(p), PatchConfig())
    rep = patch_slides([p], tmp_path / "job", PatchConfig(thumbnail_max_side=128), progress=False)
    assert "nompp.tiff" in rep.failed[p] and not rep.written
    rep = patch_slides([p], tmp_path / "job", PatchConfig(thumbnail_max_side=128), mpp=0.5, progress=False)
    g = read_coords(rep.written[p])
    assert g.mpp == 0.5 and g.attrs["mpp_source"] == "argument" and g.num_patches > 0


def test_empty_slide_writes_empty_file(tmp_path):
    img, _ = tissue_image(768, 768, ellipses=[])
    p = write_pyramid_tiff(tmp_path / "glass.tiff", img, mpp=0.5, levels=2)
    rep = patch_slides([p], tmp_path / "job", PatchConfig(thumbnail_max_side=128), progress=False)
    assert rep.empty == ["glass"] and rep.num_patches["glass"] == 0
    with h5py.File(rep.written[p], "r") as f:
        assert f["coords"].shape == (0, 2)
    assert read_coords(rep.written[p]).num_patches == 0


def test_visualization_draws_the_tissue_contour(slides, synthetic, tmp_path):
    from PIL import Image

    _, truth = synthetic
    cfg = PatchConfig(thumbnail_max_side=512, patch_size=128)
    slide = open_slide(slides["20x"])
    rep = patch_slides([slides["20x"]], tmp_path, cfg, progress=False)
    png = visualization_path(tmp_path, read_coords(rep.written[Path(slides["20x"])]))
    pic = np.asarray(Image.open(png).convert("RGB"))
    thumb, ds = slide.thumbnail(max_side=512)
    assert pic.shape == thumb.shape
    green = np.all(pic == CONTOUR_RGB, axis=2)
    # Points on the outer boundary of the first ellipse (cy, cx, ry, rx) = (0.35, 0.3, 0.22, 0.18).
    for a in np.linspace(0, 2 * np.pi, 12, endpoint=False):
        y = (0.35 + 0.22 * np.sin(a)) * SIZE / ds
        x = (0.3 + 0.18 * np.cos(a)) * SIZE / ds
        yi, xi = int(y), int(x)
        assert green[yi - 3:yi + 4, xi - 3:xi + 4].any(), (a, yi, xi)
    # Contour around the big hole, none around the filled small hole, none in open glass.
    cy, cx, r = BIG_HOLE
    yi, xi = int((cy + r) * SIZE / ds), int(cx * SIZE / ds)
    assert green[yi - 3:yi + 4, xi - 3:xi + 4].any()
    cy, cx, r = SMALL_HOLE
    yi, xi = int((cy + r) * SIZE / ds), int(cx * SIZE / ds)
    assert not green[yi - 2:yi + 3, xi - 2:xi + 3].any()
    assert not green[int(0.9 * 512):, : int(0.2 * 512)].any()
    # Patch outlines are blue-ish where the grid is.
    x, y = read_coords(rep.written[Path(slides["20x"])]).coords[0]
    edge = pic[int(y / ds) + 5, int(x / ds)]
    assert edge[2] > 150 and edge[0] < 100 and edge[1] < 100


def test_find_slides(tmp_path):
    for name in ("a.svs", "b.TIFF", "c.txt", ".hidden.svs", "sub/d.ndpi"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in find_slides(SlidesConfig(dir=str(tmp_path)))] == ["a.svs", "b.TIFF"]
    assert [p.name for p in find_slides(SlidesConfig(dir=str(tmp_path), recursive=True))] == \
        ["a.svs", "b.TIFF", "d.ndpi"]
    assert find_slides(SlidesConfig(dir=str(tmp_path / "a.svs"))) == [tmp_path / "a.svs"]
    with pytest.raises(FileNotFoundError, match="nope"):
        find_slides(SlidesConfig(dir=str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="slides.dir"):
        find_slides(SlidesConfig())


def test_cli_reports_bad_slides_and_resumes(tmp_path, synthetic, capsys):
    img, _ = synthetic
    d = tmp_path / "slides"
    write_pyramid_tiff(d / "good.tiff", img[:1024, :1024], mpp=0.5, levels=2)
    rng = np.random.default_rng(0)
    (d / "broken.svs").write_bytes(rng.bytes(5000))
    (d / "broken2.tiff").write_bytes(rng.bytes(5000))
    with pytest.raises(SlideReadError, match="broken.svs"):
        open_slide(d / "broken.svs")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"slides: {{dir: {d}, job_dir: {tmp_path / 'unused'}}}\npatch: {{patch_size: 128}}\n")
    job = tmp_path / "job"
    argv = ["patch", "--config", str(cfg), "--job-dir", str(job), "--set", "patch.thumbnail_max_side=128"]
    assert cli.main(argv) == 1
    out, err = capsys.readouterr()
    assert "broken.svs" in err and "broken2.tiff" in err and "FAILED" in err
    assert "patched 1 slide(s), 0 already done, 2 failed" in out
    good = job / "20x_128px_0px_overlap" / "patches" / "good_patches.h5"
    png = job / "20x_128px_0px_overlap" / "visualization" / "good.png"
    assert good.is_file() and png.is_file() and not (tmp_path / "unused").exists()
    n = read_coords(good).num_patches
    assert f"good.tiff: {n} patches" in out and n > 0
    before = good.stat().st_mtime_ns
    assert cli.main(argv) == 1
    out, _ = capsys.readouterr()
    assert "0 slide(s), 1 already done, 2 failed" in out and good.stat().st_mtime_ns == before
    # Only the good slide, given on the command line: nothing fails.
    assert cli.main(argv + ["--slides", str(d / "good.tiff"), "--overwrite"]) == 0
    assert good.stat().st_mtime_ns >= before
    assert cli.main(["patch", "--slides", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err


# -- a real slide --------------------------------------------------------------------------------


def _real_slide() -> Path:
    try:
        return cmu_small_region()
    except RuntimeError as e:
        pytest.skip(f"real H&E slide unavailable: {e}")


def test_real_slide_grid(tmp_path):
    path = _real_slide()
    cfg = PatchConfig(target_magnification=20, patch_size=256)
    slide = open_slide(path)
    plan = plan_patches(slide, cfg)
    g = plan.grid
    assert g.num_patches > 10 and g.patch_size_level0 == 256 and g.read_level == 0
    W0, H0 = slide.dimensions
    fr = np.array([_fractions_by_overlap(plan.tissue, W0, H0, [x], [y], 256)[0, 0] for x, y in g.coords])
    assert (fr >= cfg.min_tissue - 1e-9).all()
    # The skin section covers about a third of the picture; tissue pixels are the coloured ones.
    rgb, _ = slide.thumbnail(downsample=plan.tissue_downsample)
    assert 0.2 < plan.tissue.mean() < 0.6
    s = rgb.max(axis=2).astype(float) - rgb.min(axis=2)
    assert s[plan.tissue].mean() > 3 * s[~plan.tissue].mean()
    thumb, ds = slide.thumbnail(max_side=1024)
    out = draw_visualization(thumb, ds, plan.tissue, g, tmp_path / "cmu.png")
    assert out.is_file()
    if os.environ.get("SSM2D_KEEP_PNG"):
        draw_visualization(thumb, ds, plan.tissue, g, Path(os.environ["SSM2D_KEEP_PNG"]))
