"""``ssm2d-path inspect`` and ``ssm2d-path convert`` on real temporary files, through ``cli.main``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _featfiles as ff  # noqa: E402

from ssm2d_path import cli  # noqa: E402
from ssm2d_path.io import read_slide  # noqa: E402


@pytest.fixture
def rng():
    return np.random.default_rng(99)


def _xy(r, c, stride):
    return np.stack([c * stride, r * stride], axis=1)


def _trident_folder(d, rng):
    r40, c40 = ff.lattice(rng, 6, 9)
    r20, c20 = ff.lattice(rng, 4, 3)
    ff.write_trident(d / "s40.h5", rng.standard_normal((len(r40), 8)), _xy(r40, c40, 512) + 4096, psl0=512)
    ff.write_trident(d / "s20.h5", rng.standard_normal((len(r20), 8)), _xy(r20, c20, 256), psl0=256, l0mag=20.0)
    return {"s40": (len(r40), [6, 9]), "s20": (len(r20), [4, 3])}


def test_inspect_json_mixed_strides(tmp_path, rng, capsys):
    d = tmp_path / "20x_256px_0px_overlap" / "features_enc"
    want = _trident_folder(d, rng)
    ff.write_clam_patches(tmp_path / "patches" / "p.h5", np.zeros((1, 2)))  # not a feature file: skipped
    assert cli.main(["inspect", str(tmp_path), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    rows = {r["slide"]: r for r in rep["slides"]}
    assert set(rows) == set(want)
    for s, (n, grid) in want.items():
        assert (rows[s]["n"], rows[s]["grid"], rows[s]["format"]) == (n, grid, "trident")
        assert rows[s]["fill"] == pytest.approx(100 * n / (grid[0] * grid[1]))
        assert rows[s]["stride_source"] == "attribute" and rows[s]["encoder"] == "enc" and rows[s]["f"] == 8
    assert rows["s40"]["stride"] == 512 and rows["s20"]["stride"] == 256
    assert rows["s40"]["magnification"] == 20.0
    s = rep["summary"]
    assert (s["ok"], s["failed"], s["patches"], s["patches_files_skipped"]) == (2, 0, sum(v[0] for v in want.values()), 1)
    assert s["strides"] == {"256": 1, "512": 1}


def test_inspect_table_reports_empty_and_failed(tmp_path, rng, capsys):
    want = _trident_folder(tmp_path, rng)
    ff.write_trident(tmp_path / "empty.h5", np.zeros((0, 8)), np.zeros((0, 2)), psl0=256)
    (tmp_path / "broken.h5").write_bytes(b"\x89HDF\r\n\x1a\n truncated")
    assert cli.main(["inspect", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "broken.h5" in out and "FAILED" in out and "EMPTY" in out
    assert "6x9" in out and "4x3" in out
    assert "4 file(s): 2 ok, 1 empty, 1 failed" in out and f"{sum(v[0] for v in want.values())} patches" in out
    # A single file, named explicitly.
    assert cli.main(["inspect", str(tmp_path / "s20.h5")]) == 0
    assert "1 file(s): 1 ok" in capsys.readouterr().out


def test_inspect_clam_pt_needs_patches_dir(tmp_path, rng, capsys):
    r, c = ff.lattice(rng, 3, 5)
    ff.write_clam_pt(tmp_path / "pt_files" / "s.pt", rng.standard_normal((len(r), 4)))
    ff.write_clam_patches(tmp_path / "patches" / "s.h5", _xy(r, c, 512), patch_size=256, patch_level=1,
                          downsample=(2.0, 2.0))
    assert cli.main(["inspect", str(tmp_path / "pt_files"), "--json"]) == 1
    assert "patches" in json.loads(capsys.readouterr().out)["slides"][0]["error"]
    assert cli.main(["inspect", str(tmp_path / "pt_files"), "--patches-dir", str(tmp_path / "patches"), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["slides"][0]
    assert (row["stride"], row["grid"], row["n"]) == (512, [3, 5], len(r))


def test_convert_clam(tmp_path, rng, capsys):
    src, pat = tmp_path / "clam", tmp_path / "patches"
    want = {}
    for s in ("a", "b"):
        r, c = ff.lattice(rng, 4, 5)
        x = _xy(r, c, 512) + 1024
        feats = rng.standard_normal((len(r), 6))
        ff.write_clam_h5(src / "h5_files" / f"{s}.h5", feats, x)
        ff.write_clam_patches(pat / f"{s}.h5", x, patch_size=256, patch_level=1, downsample=(2.0, 2.0))
        want[s] = (feats, x)
    ff.write_clam_h5(src / "h5_files" / "nan.h5", np.full((2, 6), np.nan), np.array([[0, 0], [512, 0]]))
    ff.write_clam_h5(src / "h5_files" / "empty.h5", np.zeros((0, 6)), np.zeros((0, 2)))
    dst = tmp_path / "out"
    assert cli.main(["convert", str(src), str(dst), "--from", "clam", "--patches-dir", str(pat)]) == 2
    assert "--level0-magnification" in capsys.readouterr().err
    rc = cli.main(["convert", str(src), str(dst), "--from", "clam", "--patches-dir", str(pat),
                   "--level0-magnification", "40", "--encoder", "r50"])
    assert rc == 1  # the NaN file failed; the others were converted
    cap = capsys.readouterr()
    assert "nan.h5" in cap.err and "FAILED" in cap.err and "empty.h5" in cap.err
    assert "converted 2 slide(s)" in cap.out and "1 failed" in cap.out
    out_dir = dst / "20x_256px_0px_overlap" / "features_r50"
    assert sorted(p.name for p in out_dir.iterdir()) == ["a.h5", "b.h5"]
    for s, (feats, x) in want.items():
        g = read_slide(out_dir / f"{s}.h5")
        np.testing.assert_allclose(g.features.numpy(), feats.astype(np.float32))
        np.testing.assert_array_equal(g.coords, x)
        assert g.stride == 512 and g.shape == (4, 5)
        with h5py.File(out_dir / f"{s}.h5") as f:
            assert f.attrs["source_format"] == "clam" and f.attrs["source_patches_file"] == str(pat / f"{s}.h5")
    # Running again keeps what is there.
    cli.main(["convert", str(src), str(dst), "--from", "clam", "--patches-dir", str(pat), "--level0-magnification", "40",
              "--encoder", "r50"])
    assert "2 already there" in capsys.readouterr().out


def test_convert_stamp_then_inspect(tmp_path, rng, capsys):
    src = tmp_path / "stamp"
    r, c = ff.lattice(rng, 3, 7)
    ff.write_stamp(src / "x.h5", rng.standard_normal((len(r), 4)), _xy(r, c, 112.0) + 50.5, tile_um=112.0,
                   tile_px=224, extractor="ctranspath")
    dst = tmp_path / "out"
    assert cli.main(["convert", str(src), str(dst), "--from", "stamp"]) == 0
    capsys.readouterr()
    out = dst / "20x_224px_0px_overlap" / "features_ctranspath" / "x.h5"
    assert out.is_file()
    assert cli.main(["inspect", str(out), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["slides"][0]
    assert (row["format"], row["stride"], row["grid"], row["encoder"]) == ("trident", 224, [3, 7], "ctranspath")
