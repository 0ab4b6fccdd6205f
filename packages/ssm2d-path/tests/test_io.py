"""Readers, stride resolution, the TRIDENT writer and conversion, on real files written with h5py."""

from __future__ import annotations

import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _featfiles as ff  # noqa: E402

from ssm2d_path.io import (EmptySlideError, SlideFileError, convert_slide, detect_format, infer_spacing,  # noqa: E402
                           infer_stride, read_slide, write_trident)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def _coords(rows, cols, stride, origin):
    return np.stack([cols * stride + origin[0], rows * stride + origin[1]], axis=1)


def _assert_grid(g, rows, cols):
    """Grid indices computed independently: from the lattice the test generated."""
    er, ec = rows - rows.min(), cols - cols.min()
    np.testing.assert_array_equal(g.rows, er)
    np.testing.assert_array_equal(g.cols, ec)
    assert g.shape == (int(er.max()) + 1, int(ec.max()) + 1)
    assert int(g.mask.sum()) == len(rows)


def test_40x_and_20x_native_slides_in_one_folder(tmp_path, rng):
    d = tmp_path / "20x_256px_0px_overlap" / "features_enc"
    r40, c40 = ff.lattice(rng, 7, 11)
    r20, c20 = ff.lattice(rng, 5, 4)
    x40 = _coords(r40, c40, 512, (3072, 1536))
    x20 = _coords(r20, c20, 256, (768, 2048))
    f40, f20 = rng.standard_normal((len(r40), 16)), rng.standard_normal((len(r20), 16))
    ff.write_trident(d / "s40.h5", f40, x40, psl0=512, l0mag=40.0)
    ff.write_trident(d / "s20.h5", f20, x20, psl0=256, l0mag=20.0)
    g40, g20 = read_slide(d / "s40.h5"), read_slide(d / "s20.h5")
    assert (g40.stride, g20.stride) == (512, 256)
    assert g40.meta["stride_source"] == g20.meta["stride_source"] == "attribute"
    assert g40.meta["format"] == "trident" and g40.meta["encoder"] == "enc"
    assert g40.meta["magnification"] == 20.0 and g40.meta["level0_magnification"] == 40.0
    _assert_grid(g40, r40, c40)
    _assert_grid(g20, r20, c20)
    assert g40.shape == (7, 11) and g20.shape == (5, 4)
    assert g40.features.dtype == torch.float32
    np.testing.assert_allclose(g40.features.numpy(), f40.astype(np.float32))
    np.testing.assert_array_equal(g20.coords, x20)
    assert g40.slide_id == "s40" and g40.patch_size_level0 == 512


def test_trident_overlap_uses_coordinate_spacing(tmp_path, rng):
    # 256 px at 20x from a 40x slide with 64 px overlap: TRIDENT steps 512 - 128 = 384 level-0 px.
    r, c = ff.lattice(rng, 6, 9)
    x = _coords(r, c, 384, (100, 200))
    ff.write_trident(tmp_path / "ov.h5", rng.standard_normal((len(r), 8)), x, psl0=512, ps=256, overlap=64)
    g = read_slide(tmp_path / "ov.h5")
    assert g.stride == 384 and g.meta["stride_source"] == "attribute" and g.patch_size_level0 == 512
    _assert_grid(g, r, c)
    assert infer_stride(x) == 384


@pytest.mark.parametrize("stride", [224, 256, 384, 512, 1000])
def test_infer_stride_with_missing_patches(rng, stride):
    for keep in (0.3, 0.6, 0.95):
        r, c = ff.lattice(rng, 12, 15, keep=keep)
        x = _coords(r, c, stride, tuple(rng.integers(0, 5000, 2)))
        assert infer_stride(x) == stride
        assert infer_spacing(x.astype(np.float64) * 0.2525) == pytest.approx(stride * 0.2525, rel=1e-6)


def test_infer_stride_when_most_neighbours_are_two_cells_apart():
    # Rows hold every other cell (difference 2s), only one column pair is adjacent: the mode is 2s,
    # but s divides every difference and is the lattice step.
    s = 300
    cells = [(r, 2 * k) for r in range(0, 8, 2) for k in range(6)] + [(1, 0)]
    x = np.array([[c * s, r * s] for r, c in cells])
    assert infer_stride(x) == s


def test_off_lattice_trident_coords_use_their_spacing(tmp_path, caplog):
    # Coordinates spaced 128 in a file that declares 256: the grid follows the coordinates.
    x = np.array([[0, 0], [128, 0], [256, 0], [256, 128]])
    ff.write_trident(tmp_path / "s.h5", np.zeros((4, 2)), x, psl0=256)
    g = read_slide(tmp_path / "s.h5")
    assert g.stride == 128 and g.shape == (2, 3) and "disagrees" in caplog.text


def test_infer_stride_needs_two_positions():
    with pytest.raises(ValueError, match="fewer than two"):
        infer_stride(np.array([[5, 5]]))


def test_single_patch_slide_is_a_1x1_grid(tmp_path):
    ff.write_clam_h5(tmp_path / "one.h5", np.ones((1, 4)), np.array([[512, 1024]]))
    g = read_slide(tmp_path / "one.h5")
    assert g.shape == (1, 1) and g.num_patches == 1


@pytest.mark.parametrize("downsample,level,psl0", [((2.0, 2.0), 1, 512),          # CLAM: the level's (dx, dy)
                                                     ([[1, 1], [4, 4], [16, 16]], 1, 1024),  # per-level list
                                                     (4.0, 2, 1024),                # scalar
                                                     ((1.0, 1.0), 0, 256)])
def test_clam_h5_with_patches_stride_from_attributes(tmp_path, rng, downsample, level, psl0):
    r, c = ff.lattice(rng, 5, 8)
    x = _coords(r, c, psl0, (2 * psl0, 7 * psl0))
    feats = rng.standard_normal((len(r), 6))
    ff.write_clam_h5(tmp_path / "h5_files" / "s.h5", feats, x)
    ff.write_clam_patches(tmp_path / "patches" / "s.h5", x, patch_size=256, patch_level=level, downsample=downsample)
    g = read_slide(tmp_path / "h5_files" / "s.h5", patches_path=tmp_path / "patches" / "s.h5")
    assert g.meta["format"] == "clam" and g.stride == psl0 and g.meta["stride_source"] == "attribute"
    assert g.patch_size_level0 == psl0
    _assert_grid(g, r, c)
    # Without the patches file the stride is inferred, with the same grid.
    g2 = read_slide(tmp_path / "h5_files" / "s.h5")
    assert g2.stride == psl0 and g2.meta["stride_source"] == "inferred"
    _assert_grid(g2, r, c)


def test_clam_step_smaller_than_patch_uses_spacing(tmp_path, rng, caplog):
    r, c = ff.lattice(rng, 4, 6)
    x = _coords(r, c, 128, (0, 0))  # CLAM step_size 128 with patch_size 256: overlapping patches
    ff.write_clam_h5(tmp_path / "s.h5", rng.standard_normal((len(r), 3)), x)
    ff.write_clam_patches(tmp_path / "p.h5", x, patch_size=256)
    with caplog.at_level("WARNING"):
        g = read_slide(tmp_path / "s.h5", patches_path=tmp_path / "p.h5")
    assert g.stride == 128 and g.meta["stride_source"] == "inferred" and "disagrees" in g.meta["stride_note"]
    assert "disagrees" in caplog.text
    _assert_grid(g, r, c)


def test_clam_stride_argument(tmp_path, rng):
    # Sparse tissue (no two patches adjacent) cannot tell the stride; the argument does.
    x = np.array([[0, 0], [1024, 512], [2048, 1536]])
    ff.write_clam_h5(tmp_path / "s.h5", np.ones((3, 2)), x)
    g = read_slide(tmp_path / "s.h5", stride=512)
    assert g.stride == 512 and g.meta["stride_source"] == "argument" and g.shape == (4, 5)
    with pytest.raises(SlideFileError, match="s.h5.*stride=300"):
        read_slide(tmp_path / "s.h5", stride=300)


def test_clam_pt_with_patches(tmp_path, rng):
    r, c = ff.lattice(rng, 6, 5)
    x = _coords(r, c, 512, (512, 0))
    feats = rng.standard_normal((len(r), 10)).astype(np.float32)
    pt = ff.write_clam_pt(tmp_path / "pt_files" / "a.pt", feats)
    patches = ff.write_clam_patches(tmp_path / "patches" / "a.h5", x, patch_size=256, patch_level=1, downsample=(2.0, 2.0))
    assert detect_format(pt) == "clam"
    with pytest.raises(SlideFileError, match=r"a\.pt.*patches"):
        read_slide(pt)
    g = read_slide(pt, patches_path=patches)
    assert g.stride == 512 and g.features.dtype == torch.float32
    np.testing.assert_array_equal(g.features.numpy(), feats)
    np.testing.assert_array_equal(g.coords, x)
    _assert_grid(g, r, c)


@pytest.mark.parametrize("mpp", [None, 0.25])
def test_stamp_micrometre_coordinates(tmp_path, rng, mpp):
    r, c = ff.lattice(rng, 5, 7)
    tile_um, tile_px = 256.0, 224
    um = _coords(r, c, tile_um, (1234.5, 987.25)) + rng.uniform(-0.01, 0.01, (len(r), 2))  # float noise
    feats = rng.standard_normal((len(r), 12))
    p = ff.write_stamp(tmp_path / "st.h5", feats, um, tile_um=tile_um, tile_px=tile_px)
    assert detect_format(p) == "stamp"
    g = read_slide(p, mpp=mpp)
    _assert_grid(g, r, c)
    np.testing.assert_array_equal(g.meta["coords_um"], um)
    np.testing.assert_array_equal(g.features.numpy(), feats.astype(np.float16).astype(np.float32))
    assert g.features.dtype == torch.float32 and g.meta["encoder"] == "ext"
    assert g.meta["magnification"] == pytest.approx(10 * tile_px / tile_um)
    if mpp is None:
        assert g.meta["coords_unit"] == "tile_px" and g.stride == tile_px
        np.testing.assert_array_equal(g.coords, np.rint(um * tile_px / tile_um))
    else:
        assert g.meta["coords_unit"] == "level0_px" and g.stride == 1024
        np.testing.assert_array_equal(g.coords, np.rint(um / mpp))


def _good_trident(path, rng, n=6):
    r, c = ff.lattice(rng, 3, 4)
    return ff.write_trident(path, rng.standard_normal((len(r), 4)), _coords(r, c, 256, (0, 0)), psl0=256)


def _corrupt(kind, path, rng):
    if kind == "truncated":
        _good_trident(path, rng)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif kind == "not_h5":
        path.write_text("slide_id,label\na,1\n")
    elif kind == "no_features":
        with h5py.File(path, "w") as f:
            f.create_dataset("coords", data=np.zeros((3, 2)))
            f.create_dataset("other", data=np.zeros(3))
    elif kind == "no_coords":
        with h5py.File(path, "w") as f:
            f.create_dataset("features", data=np.zeros((3, 2))).attrs["encoder"] = "e"
    elif kind == "mismatch":
        ff.write_trident(path, np.zeros((5, 4)), np.array([[0, 0], [256, 0], [512, 0]]), psl0=256)
    elif kind in ("nan", "inf"):
        f = rng.standard_normal((3, 4))
        f[1, 2] = np.nan if kind == "nan" else np.inf
        ff.write_trident(path, f, np.array([[0, 0], [256, 0], [512, 0]]), psl0=256)
    elif kind == "duplicate":
        ff.write_trident(path, np.zeros((3, 4)), np.array([[0, 0], [256, 0], [256, 0]]), psl0=256)
    elif kind == "features_1d":
        with h5py.File(path, "w") as f:
            f.create_dataset("features", data=np.zeros(3))
            f.create_dataset("coords", data=np.zeros((3, 2)))
    elif kind == "coords_3col":
        ff.write_clam_h5(path, np.zeros((3, 4)), np.zeros((3, 3)))
    elif kind == "off_lattice":
        ff.write_trident(path, np.zeros((3, 4)), np.array([[0, 0], [256, 0], [600, 0]]), psl0=256)
    elif kind == "stamp_missing_coords":
        with h5py.File(path, "w") as f:
            f.create_dataset("feats", data=np.zeros((3, 4), np.float16))
    return path


CORRUPTIONS = ["truncated", "not_h5", "no_features", "no_coords", "mismatch", "nan", "inf", "duplicate",
               "features_1d", "coords_3col", "off_lattice", "stamp_missing_coords"]


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corrupt_files_name_the_file(tmp_path, rng, kind):
    path = _corrupt(kind, tmp_path / f"bad_{kind}.h5", rng)
    with pytest.raises(SlideFileError) as e:
        read_slide(path)
    assert str(path) in str(e.value)
    assert not isinstance(e.value, EmptySlideError)


def test_corrupt_pt_and_wrong_content(tmp_path, rng):
    ff.write_clam_patches(tmp_path / "p.h5", np.array([[0, 0], [256, 0]]))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80\x02not a torch file")
    with pytest.raises(SlideFileError, match="bad.pt"):
        read_slide(bad, patches_path=tmp_path / "p.h5")
    wrong = tmp_path / "wrong.pt"
    torch.save({"weights": torch.zeros(2)}, wrong)
    with pytest.raises(SlideFileError, match="wrong.pt.*tensor"):
        read_slide(wrong, patches_path=tmp_path / "p.h5")
    short = ff.write_clam_pt(tmp_path / "short.pt", np.zeros((3, 4)))
    with pytest.raises(SlideFileError, match="3 feature rows but 2"):
        read_slide(short, patches_path=tmp_path / "p.h5")


def test_unknown_and_patches_only_files(tmp_path):
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(SlideFileError, match="x.txt"):
        detect_format(tmp_path / "x.txt")
    p = ff.write_clam_patches(tmp_path / "patches.h5", np.array([[0, 0]]))
    with pytest.raises(SlideFileError, match="patches file"):
        read_slide(p)
    with pytest.raises(SlideFileError, match="no such file"):
        read_slide(tmp_path / "missing.h5", fmt="trident")


def test_empty_trident_slide(tmp_path):
    p = ff.write_trident(tmp_path / "empty.h5", np.zeros((0, 32)), np.zeros((0, 2)), psl0=512)
    with pytest.raises(EmptySlideError, match="empty.h5"):
        read_slide(p)


def test_write_trident_roundtrip_and_atomicity(tmp_path, rng):
    r, c = ff.lattice(rng, 4, 5)
    x = _coords(r, c, 512, (1024, 0))
    feats = torch.randn(len(r), 7, dtype=torch.float64)
    dst = tmp_path / "out" / "s.h5"
    out = write_trident(dst, feats, x, patch_size=256, patch_size_level0=512, level0_magnification=40,
                        target_magnification=20, level0_width=9000, level0_height=7000, encoder="uni",
                        extra_attrs={"source_format": "clam", "source_attr_downsample": (2.0, 2.0)})
    assert out == dst and [p.name for p in dst.parent.iterdir()] == ["s.h5"]
    with h5py.File(dst) as f:
        assert f["features"].dtype == np.float32 and f["coords"].dtype == np.int64
        assert f["features"].attrs["encoder"] == "uni"
        a = dict(f["coords"].attrs)
        assert (a["patch_size"], a["patch_size_level0"], a["overlap"], a["name"]) == (256, 512, 0, "s")
        assert (a["level0_width"], a["level0_height"]) == (9000, 7000)
        assert a["target_magnification"] == 20 and a["level0_magnification"] == 40
        assert f.attrs["source_format"] == "clam"
        np.testing.assert_array_equal(f.attrs["source_attr_downsample"], [2.0, 2.0])
    g = read_slide(dst)
    _assert_grid(g, r, c)
    np.testing.assert_allclose(g.features.numpy(), feats.numpy().astype(np.float32))
    # A failing write leaves the existing file as it was and no temporary file behind.
    before = dst.read_bytes()
    with pytest.raises(Exception):
        write_trident(dst, feats, x, patch_size=256, patch_size_level0=512, level0_magnification=40,
                      target_magnification=20, level0_width=1, level0_height=1, encoder="uni",
                      extra_datasets={"bad": np.array([object()])})
    assert dst.read_bytes() == before and [p.name for p in dst.parent.iterdir()] == ["s.h5"]
    with pytest.raises(ValueError, match="coords"):
        write_trident(tmp_path / "y.h5", feats, x[:-1], patch_size=256, patch_size_level0=512,
                      level0_magnification=40, target_magnification=20, level0_width=1, level0_height=1, encoder="e")


def test_convert_clam_keeps_geometry_and_provenance(tmp_path, rng):
    r, c = ff.lattice(rng, 5, 6)
    x = _coords(r, c, 512, (512, 1024))
    feats = rng.standard_normal((len(r), 9))
    src = ff.write_clam_h5(tmp_path / "h5_files" / "s1.h5", feats, x)
    pat = ff.write_clam_patches(tmp_path / "patches" / "s1.h5", x, patch_size=256, patch_level=1,
                                downsample=(2.0, 2.0), level_dim=(3000, 2500))
    with pytest.raises(ValueError, match="level0_magnification"):
        convert_slide(src, tmp_path / "out", fmt="clam", patches_path=pat)
    dst, written = convert_slide(src, tmp_path / "out", fmt="clam", patches_path=pat, level0_magnification=40,
                                 encoder="resnet50")
    assert written and dst == tmp_path / "out" / "20x_256px_0px_overlap" / "features_resnet50" / "s1.h5"
    g = read_slide(dst)
    assert g.meta["format"] == "trident" and g.stride == 512 and g.meta["stride_source"] == "attribute"
    _assert_grid(g, r, c)
    np.testing.assert_allclose(g.features.numpy(), feats.astype(np.float32))
    with h5py.File(dst) as f:
        assert f.attrs["source_format"] == "clam" and f.attrs["source_file"] == str(src)
        assert f.attrs["source_attr_patch_level"] == 1
        assert (f["coords"].attrs["level0_width"], f["coords"].attrs["level0_height"]) == (6000, 5000)
    assert convert_slide(src, tmp_path / "out", fmt="clam", patches_path=pat, level0_magnification=40,
                         encoder="resnet50") == (dst, False)


def test_convert_clam_overlap_roundtrip(tmp_path, rng):
    r, c = ff.lattice(rng, 4, 4)
    x = _coords(r, c, 384, (0, 0))  # 512 level-0 patches stepped by 384
    src = ff.write_clam_h5(tmp_path / "s.h5", rng.standard_normal((len(r), 3)), x)
    pat = ff.write_clam_patches(tmp_path / "p.h5", x, patch_size=256, patch_level=1, downsample=(2.0, 2.0))
    dst, _ = convert_slide(src, tmp_path / "out", fmt="clam", patches_path=pat, level0_magnification=40)
    assert dst.parent.parent.name == "20x_256px_64px_overlap"
    g = read_slide(dst)
    assert g.stride == 384 and g.meta["stride_source"] == "attribute" and g.patch_size_level0 == 512
    _assert_grid(g, r, c)


def test_convert_stamp(tmp_path, rng):
    r, c = ff.lattice(rng, 4, 6)
    um = _coords(r, c, 256.0, (300.0, 600.0))
    feats = rng.standard_normal((len(r), 5))
    src = ff.write_stamp(tmp_path / "st.h5", feats, um, tile_um=256.0, tile_px=512, extractor="ctp")
    dst, _ = convert_slide(src, tmp_path / "out", fmt="stamp", mpp=0.25)
    assert dst == tmp_path / "out" / "20x_512px_0px_overlap" / "features_ctp" / "st.h5"
    g = read_slide(dst)
    assert g.stride == 1024 and g.meta["level0_magnification"] == 40
    _assert_grid(g, r, c)
    with h5py.File(dst) as f:
        np.testing.assert_array_equal(f["coords_um"][()], um)
        assert f.attrs["source_attr_extractor"] == "ctp" and f.attrs["source_coords_unit"] == "level0_px"
