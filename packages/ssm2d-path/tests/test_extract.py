"""Feature extraction: features against an independent reference, the TRIDENT file, resume, atomicity,
local weights, missing slides, sharding across ranks (in-process and under torchrun)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from _slides import tissue_image, write_pyramid_tiff
from ssm2d_path.io import read_slide
from ssm2d_path.wsi.coords import PatchGrid, patches_path, write_coords
from ssm2d_path.wsi.encoder import build_encoder, load_encoder_weights
from ssm2d_path.wsi.extract import extract_slide, extract_slides, features_path, shard
from ssm2d_path.wsi.settings import ExtractConfig
from ssm2d_path.wsi.slide import open_slide

from ssm2d_nn._compat import import_timm

timm = import_timm()
import timm.data  # noqa: E402

ENC = "test_vit"  # a tiny timm model (64-d features), randomly initialised
MPP = 0.5


def make_slide(folder: Path, name: str, *, h: int = 256, w: int = 320, seed: int = 0) -> tuple[Path, np.ndarray]:
    img, _ = tissue_image(h, w, seed=seed)
    return write_pyramid_tiff(folder / f"{name}.tif", img, mpp=MPP, levels=3, tile=64), img


def make_grid(slide_path: Path, img: np.ndarray, *, patch_size: int = 32, downsample: int = 1,
              step: int = 1, rng=None) -> PatchGrid:
    """A regular lattice of patches inside the slide (every ``step``-th cell, a random subset with ``rng``)."""
    psl0 = patch_size * downsample
    h, w = img.shape[:2]
    ys, xs = np.meshgrid(np.arange(0, h - psl0 + 1, psl0 * step), np.arange(0, w - psl0 + 1, psl0 * step),
                         indexing="ij")
    coords = np.stack([xs.ravel(), ys.ravel()], 1)
    if rng is not None:
        coords = coords[np.sort(rng.choice(len(coords), size=len(coords) // 2, replace=False))]
    l0mag = 10.0 / MPP
    return PatchGrid(name=slide_path.stem, coords=coords, patch_size=patch_size, patch_size_level0=psl0,
                     stride_level0=psl0, overlap=0, level0_magnification=l0mag,
                     target_magnification=l0mag / downsample, mpp=MPP, target_mpp=MPP * downsample,
                     level0_width=w, level0_height=h, slide_path=str(slide_path.resolve()))


def make_job(tmp_path: Path, n: int = 2, **grid_kw) -> tuple[Path, list[Path], dict]:
    job = tmp_path / "job"
    files, grids = [], {}
    for i in range(n):
        sp, img = make_slide(tmp_path / "slides", f"slide{i}", seed=i, h=192 + 64 * i, w=256)
        g = make_grid(sp, img, **grid_kw)
        files.append(write_coords(patches_path(job, g), g))
        grids[g.name] = (g, img, sp)
    return job, files, grids


def cfg(**kw) -> ExtractConfig:
    base = dict(encoder=ENC, batch_size=16, num_workers=0, device="cpu")
    base.update(kw)
    return ExtractConfig(**base)


def reference_features(model, pixels: np.ndarray, coords, size: int) -> np.ndarray:
    """Patches cut straight from the pyramid level's pixels, timm's eval transform, the model in float32."""
    from PIL import Image

    tf = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model), is_training=False)
    x = torch.stack([tf(Image.fromarray(np.ascontiguousarray(pixels[y:y + size, x:x + size]))) for x, y in coords])
    with torch.no_grad():
        return model.float().eval()(x).numpy()


@pytest.mark.parametrize("downsample", [1, 2])
def test_features_match_reference_and_trident_file(tmp_path, downsample):
    import tifffile

    torch.manual_seed(0)
    job, files, grids = make_job(tmp_path, n=1, downsample=downsample)
    (grid, img, sp), = grids.values()
    enc = build_encoder(cfg())
    rep = extract_slides(files, job, cfg(), encoder=enc, progress=False)
    assert not rep.failed and len(rep.written) == 1 and rep.patches == grid.num_patches > 0
    assert rep.patches_per_s > 0
    dest = features_path(job, grid, ENC)
    assert rep.written == [dest] and dest.parent.name == f"features_{ENC}"
    # independent reference: the level the reader must pick holds the patch at exactly patch_size px
    pixels = tifffile.imread(sp, key=int(np.log2(downsample)))
    if downsample == 1:
        assert np.array_equal(pixels, img)
    coords_level = grid.coords // downsample
    ref = reference_features(enc.model, pixels, coords_level, grid.patch_size)
    with h5py.File(dest, "r") as f:
        feats, coords = f["features"][()], f["coords"][()]
        c, root = dict(f["coords"].attrs), dict(f.attrs)
        assert f["features"].attrs["encoder"] == ENC
    assert feats.dtype == np.float32 and feats.shape == (grid.num_patches, enc.feature_dim)
    np.testing.assert_allclose(feats, ref, rtol=1e-4, atol=1e-5)
    assert np.array_equal(coords, grid.coords)
    for k, v in {"patch_size": 32, "patch_size_level0": 32 * downsample, "overlap": 0, "level0_magnification": 20.0,
                 "target_magnification": 20.0 / downsample, "level0_width": img.shape[1],
                 "level0_height": img.shape[0], "name": grid.name}.items():
        assert c[k] == v, k
    assert root["slide_path"] == str(sp.resolve()) and root["precision"] == "fp32"
    assert root["encoder"] == ENC and root["encoder_weights"] == "random-init"
    assert root["ssm2d_path_version"] and "encoder_weights_sha256" in root
    sg = read_slide(dest)
    assert sg.stride == 32 * downsample
    assert sg.features.shape == (grid.num_patches, enc.feature_dim)
    # grid indices: the lattice of make_grid
    assert np.array_equal(np.asarray(sg.coords), grid.coords)


def test_worker_processes_give_the_same_features(tmp_path):
    job, files, grids = make_job(tmp_path, n=1)
    (grid, _, sp), = grids.values()
    enc = build_encoder(cfg())
    with open_slide(sp) as slide:
        a = extract_slide(enc, grid, slide, batch_size=7, num_workers=0)
        b = extract_slide(enc, grid, slide, batch_size=5, num_workers=2)
    assert a.shape == (grid.num_patches, enc.feature_dim)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_resume_skips_finished_and_redoes_changed_slides(tmp_path):
    job, files, grids = make_job(tmp_path, n=2)
    enc = build_encoder(cfg())
    rep = extract_slides(files, job, cfg(), encoder=enc, progress=False)
    assert len(rep.written) == 2
    dests = {g.name: features_path(job, g, ENC) for g, _, _ in grids.values()}
    mtimes = {k: p.stat().st_mtime_ns for k, p in dests.items()}
    time.sleep(0.01)
    rep = extract_slides(files, job, cfg(), encoder=enc, progress=False)
    assert sorted(rep.skipped) == sorted(dests.values()) and not rep.written and rep.patches == 0
    assert {k: p.stat().st_mtime_ns for k, p in dests.items()} == mtimes
    # slide1's patches change (a subset): only it is extracted again, with the new coordinates
    g1, img1, sp1 = grids["slide1"]
    g1b = make_grid(sp1, img1, rng=np.random.default_rng(3))
    write_coords(patches_path(job, g1b), g1b)
    rep = extract_slides(files, job, cfg(), encoder=enc, progress=False)
    assert rep.written == [dests["slide1"]] and rep.skipped == [dests["slide0"]]
    with h5py.File(dests["slide1"], "r") as f:
        assert np.array_equal(f["coords"][()], g1b.coords) and f["features"].shape[0] == g1b.num_patches
    assert dests["slide0"].stat().st_mtime_ns == mtimes["slide0"]
    rep = extract_slides(files, job, cfg(overwrite=True), encoder=enc, progress=False)
    assert len(rep.written) == 2


def test_crash_mid_slide_leaves_no_result_file(tmp_path):
    job, files, grids = make_job(tmp_path, n=1)
    (grid, _, _), = grids.values()
    enc = build_encoder(cfg())
    dest = features_path(job, grid, ENC)
    real_forward, calls = enc.model.forward, []

    def crash_after_first_batch(x):
        calls.append(len(x))
        if len(calls) > 1:
            raise RuntimeError("simulated crash in the second batch")
        return real_forward(x)

    enc.model.forward = crash_after_first_batch
    rep = extract_slides(files, job, cfg(batch_size=8), encoder=enc, progress=False)
    assert len(calls) == 2 and grid.num_patches > 16
    assert list(rep.failed) == [str(files[0])] and "simulated crash" in rep.failed[str(files[0])]
    assert not dest.exists()
    leftovers = list(dest.parent.glob("*")) if dest.parent.exists() else []
    assert not [p for p in leftovers if p.suffix == ".h5"], leftovers
    # a complete file survives a crash while it is being redone (overwrite)
    enc.model.forward = real_forward
    extract_slides(files, job, cfg(), encoder=enc, progress=False)
    before = dest.read_bytes()
    calls.clear()
    enc.model.forward = crash_after_first_batch
    rep = extract_slides(files, job, cfg(batch_size=8, overwrite=True), encoder=enc, progress=False)
    assert rep.failed and dest.read_bytes() == before
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]


def test_interrupted_write_leaves_only_a_temp_file_and_is_cleaned(tmp_path, monkeypatch):
    """A kill while writing (here an interrupt inside write_trident) leaves no <slide>.h5; the next run
    removes the stale temporary file of that slide and writes the result."""
    import ssm2d_path.io.trident as trident

    job, files, grids = make_job(tmp_path, n=1)
    (grid, _, _), = grids.values()
    dest = features_path(job, grid, ENC)
    enc = build_encoder(cfg())
    real_create = h5py.Group.create_dataset

    def die_on_coords(self, name, *a, **k):
        if name == "coords":
            raise KeyboardInterrupt
        return real_create(self, name, *a, **k)

    monkeypatch.setattr(trident.h5py.Group, "create_dataset", die_on_coords)
    with pytest.raises(KeyboardInterrupt):
        extract_slides(files, job, cfg(), encoder=enc, progress=False)
    monkeypatch.undo()
    assert not dest.exists()
    # simulate what a SIGKILL would have left: a temp file of the same slide
    stale = dest.parent / f".{dest.name}.abc123.tmp"
    stale.write_bytes(b"partial")
    rep = extract_slides(files, job, cfg(), encoder=enc, progress=False)
    assert rep.written == [dest] and not stale.exists()


def _save(obj, path: Path) -> Path:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in obj.items()}, str(path))
    else:
        torch.save(obj, path)
    return path


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_weights_from_a_local_file(tmp_path, fmt):
    job, files, grids = make_job(tmp_path, n=1)
    (grid, _, sp), = grids.values()
    torch.manual_seed(123)
    trained = timm.create_model("test_resnet", pretrained=False, num_classes=5)  # with a classifier head
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sd = {f"module.{k}": v for k, v in trained.state_dict().items()}
    wpath = _save({"state_dict": sd, "epoch": 3} if fmt == "pth" else sd, tmp_path / f"enc.{fmt}")
    c = cfg(encoder="test_resnet", weights=str(wpath), name="mine")
    enc = build_encoder(c)
    assert enc.name == "mine" and enc.weights_path == str(wpath.resolve()) and len(enc.weights_sha256) == 64
    trained.reset_classifier(0)
    for k, v in trained.state_dict().items():
        assert torch.equal(enc.model.state_dict()[k], v), k
    rep = extract_slides(files, job, c, progress=False)
    assert not rep.failed
    dest = features_path(job, grid, "mine")
    with h5py.File(dest, "r") as f:
        feats = f["features"][()]
        assert f.attrs["encoder_weights_sha256"] == enc.weights_sha256
        assert f.attrs["encoder"] == "test_resnet" and f["features"].attrs["encoder"] == "mine"
    ref = reference_features(trained, tifffile_level0(sp), grid.coords, grid.patch_size)
    np.testing.assert_allclose(feats, ref, rtol=1e-4, atol=1e-5)


def tifffile_level0(path):
    import tifffile

    return tifffile.imread(path, key=0)


def test_mismatched_weights_raise_naming_the_file(tmp_path):
    other = timm.create_model("test_vit", pretrained=False, num_classes=0)
    wpath = _save(other.state_dict(), tmp_path / "vit_weights.pth")
    with pytest.raises(ValueError, match=r"vit_weights\.pth.*missing.*unexpected"):
        build_encoder(cfg(encoder="test_resnet", weights=str(wpath)))
    model = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    sd = dict(model.state_dict())
    sd.pop(next(iter(sd)))
    with pytest.raises(ValueError, match=r"partial\.pth.*1 missing"):
        load_encoder_weights(model, _save(sd, tmp_path / "partial.pth"))
    with pytest.raises(ValueError, match=r"nothere\.pth"):
        build_encoder(cfg(weights=str(tmp_path / "nothere.pth")))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.pth"):
        build_encoder(cfg(weights=str(tmp_path / "junk.pth")))
    with pytest.raises(ValueError, match="encoder"):
        build_encoder(cfg(encoder="no_such_model_xyz"))


def test_missing_slide_is_reported_and_the_others_written(tmp_path):
    job, files, grids = make_job(tmp_path, n=3)
    # slide1: moved away (recorded path gone) but present in --slides; slide2: gone for good
    g1, _, sp1 = grids["slide1"]
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    sp1.rename(moved / sp1.name)
    grids["slide2"][2].unlink()
    rep = extract_slides(files, job, cfg(), slides_dir=moved, progress=False)
    assert sorted(p.stem for p in rep.written) == ["slide0", "slide1"]
    assert list(rep.failed) == [str(files[2])]
    msg = rep.failed[str(files[2])]
    assert "slide2" in msg and str(moved) in msg and str(files[2]) in msg
    with h5py.File(features_path(job, g1, ENC), "r") as f:
        assert f.attrs["slide_path"] == str((moved / sp1.name).resolve())


def test_wrong_slide_size_and_empty_grid(tmp_path):
    job, files, grids = make_job(tmp_path, n=2)
    g0, _, _ = grids["slide0"]
    g0.coords = np.zeros((0, 2), np.int64)  # a slide without tissue
    write_coords(files[0], g0)
    g1, _, _ = grids["slide1"]
    g1.level0_width += 4  # planned on another slide of the same name
    write_coords(files[1], g1)
    rep = extract_slides(files, job, cfg(), progress=False)
    assert rep.written == [features_path(job, g0, ENC)]
    with h5py.File(rep.written[0], "r") as f:
        assert f["features"].shape == (0, 64) and f["coords"].shape == (0, 2)
    assert "planned on a" in rep.failed[str(files[1])]


def test_two_ranks_split_the_slides(tmp_path):
    job, files, grids = make_job(tmp_path, n=3)
    enc = build_encoder(cfg())
    reps = [extract_slides(list(reversed(files)), job, cfg(), encoder=enc, rank=r, world_size=2, progress=False)
            for r in (0, 1)]
    a, b = ({p.stem for p in r.written} for r in reps)
    assert a and b and not a & b and a | b == set(grids)
    assert shard(range(7), 1, 3) == [1, 4] and sorted(shard(range(7), 0, 3) + shard(range(7), 1, 3)
                                                       + shard(range(7), 2, 3)) == list(range(7))


def _env() -> dict:
    root = Path(__file__).resolve().parents[3]
    paths = [str(root / "packages" / p / "src") for p in ("ssm2d-nn", "ssm2d-vision", "ssm2d-path")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")])
    return env


def test_cli_summary_and_exit_code(tmp_path):
    job, files, grids = make_job(tmp_path, n=2)
    grids["slide1"][2].unlink()
    proc = subprocess.run([sys.executable, "-m", "ssm2d_path.cli", "extract", "--job-dir", str(job), "--encoder", ENC,
                           "--device", "cpu", "--num-workers", "0", "--batch-size", "32", "--no-progress"],
                          capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "1 written, 0 already there, 1 failed" in proc.stdout and "patches/s" in proc.stdout
    assert "slide1" in proc.stderr
    g0 = grids["slide0"][0]
    assert f"{g0.num_patches} patches" in proc.stdout
    assert features_path(job, g0, ENC).is_file()


def test_torchrun_two_processes_write_every_slide_once(tmp_path):
    job, files, grids = make_job(tmp_path, n=3)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "ssm2d_path.cli", "extract", "--job-dir", str(job), "--encoder", ENC, "--device", "cpu",
           "--num-workers", "0", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    total = sum(g.num_patches for g, _, _ in grids.values())
    summaries = [line for line in proc.stdout.splitlines() if line.startswith("extract:")]
    assert len(summaries) == 1, proc.stdout  # rank 0 alone prints the all-reduced totals
    assert "3 written, 0 already there, 0 failed on 2 ranks" in summaries[0]
    assert f"{total} patches" in summaries[0]
    for g, _, _ in grids.values():
        with h5py.File(features_path(job, g, ENC), "r") as f:
            assert np.array_equal(f["coords"][()], g.coords)
    assert sorted(p.name for p in features_path(job, g, ENC).parent.iterdir()) == [f"slide{i}.h5" for i in range(3)]


@pytest.mark.gpu
def test_bf16_autocast_on_cuda_close_to_fp32(tmp_path):
    job, files, grids = make_job(tmp_path, n=1)
    (grid, _, sp), = grids.values()
    enc = build_encoder(cfg(encoder="resnet10t"))
    enc.model.to("cuda")
    with open_slide(sp) as slide:
        f32 = extract_slide(enc, grid, slide, device="cuda", precision="fp32", batch_size=32, num_workers=2)
        bf = extract_slide(enc, grid, slide, device="cuda", precision="auto", batch_size=32, num_workers=2)
    assert bf.dtype == np.float32 and np.isfinite(bf).all()
    cos = (f32 * bf).sum(1) / (np.linalg.norm(f32, axis=1) * np.linalg.norm(bf, axis=1))
    assert cos.min() > 0.99, cos.min()
    rel = np.linalg.norm(bf - f32) / np.linalg.norm(f32)
    assert rel < 0.05, rel


def test_cli_config_and_overrides(tmp_path, capsys):
    from ssm2d_path.cli import main

    job, files, grids = make_job(tmp_path, n=1)
    (grid, _, sp), = grids.values()
    moved = tmp_path / "moved"
    moved.mkdir()
    sp.rename(moved / sp.name)
    conf = tmp_path / "run.yaml"
    conf.write_text(f"slides: {{dir: {moved}, job_dir: {job}}}\n"
                    f"extract: {{encoder: {ENC}, name: small, batch_size: 8, num_workers: 0, device: cpu}}\n")
    rc = main(["extract", "--config", str(conf), "--set", "extract.encoder_kwargs={img_size: 64}", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "1 written" in out
    with h5py.File(features_path(job, grid, "small"), "r") as f:
        assert '"img_size": 64' in f.attrs["encoder_kwargs"]
        assert "(3, 64, 64)" in f.attrs["encoder_data_config"] or "[3, 64, 64]" in f.attrs["encoder_data_config"]
        assert f["features"].shape == (grid.num_patches, 64)
    assert main(["extract", "--config", str(conf), "--no-progress", "--set", "extract.batch_size=0"]) == 2
    assert "batch_size" in capsys.readouterr().err
