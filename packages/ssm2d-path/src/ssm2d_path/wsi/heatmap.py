"""Heatmaps: per-patch scores of a trained MIL model drawn over the slide's thumbnail.

Scores (:func:`patch_scores`):

* ``attention``: the model's own per-patch scores (:class:`~ssm2d_path.models.MILOutput` ``scores``: the
  attention logits of attention-pooled models, the per-patch logit of the predicted class for mean/max
  pooling);
* ``gradient``: gradient x input, ``sum_f x_if * dT/dx_if`` per patch, where ``T`` is the target class
  logit (classification; default the predicted class), the risk ``-sum_k S_k`` (discrete-time survival)
  or the single log-risk (Cox). For a 2D-scan model this is where the decision comes from once the scan
  has mixed the neighbourhood in, which attention (computed after the scan) does not show.

Scores are turned into rank percentiles (:func:`percentile_normalise`, ties averaged, as CLAM's heatmaps)
and each patch's square is painted over the thumbnail (:func:`render_overlay`): overlapping patches are
averaged, pixels without a patch keep the thumbnail. :func:`heatmap_slide` writes, per slide,
``<out>/<slide>/heatmap_<method>.png`` (with a colour bar), ``scores.csv``, ``scores.h5``,
``top_k/`` (the highest-scoring patches as PNG) and ``heatmap.json`` (the prediction and provenance).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from ..bag import Bag, SlideGrid
from .settings import SLIDE_EXTENSIONS, HeatmapConfig
from .slide import Slide, open_slide

__all__ = ["GRID_MODELS", "HeatmapReport", "export_scores", "export_top_k", "find_slide_file", "heatmap_slide",
           "heatmap_slides", "patch_scores", "percentile_normalise", "render_overlay", "resolve_methods",
           "save_heatmap_png", "target_value"]

log = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]

# Models whose patches see their 2D neighbourhood through a scan: "auto" adds the gradient map for them.
GRID_MODELS = ("2dmambamil", "m2dmil")
METHOD_LABELS = {"attention": "attention score", "gradient": "gradient \u00d7 input contribution"}


# ------------------------------------------------------------------------------------------------ scores

def resolve_methods(method: str, model_name: Optional[str] = None) -> list[str]:
    """``auto`` -> ["attention"] (+ "gradient" for GRID_MODELS); ``both`` -> both; else [method]."""
    if method == "auto":
        return ["attention"] + (["gradient"] if (model_name or "").lower() in GRID_MODELS else [])
    if method == "both":
        return ["attention", "gradient"]
    if method in ("attention", "gradient"):
        return [method]
    raise ValueError(f"method: expected auto, attention, gradient or both, got {method!r}")


def target_value(logits: Tensor, *, task: str = "classification", loss: Optional[str] = None,
                 target: Optional[int] = None) -> tuple[Tensor, Optional[int]]:
    """The scalar the gradient map explains, and the class it is (None for survival).

    Args:
        logits: (1, n_outputs) of one bag.
        task: "classification" or "survival"; loss: "nll" (hazard logits) or "cox" (one log-risk) for survival.
        target: class index (classification; default the predicted class).
    Returns:
        (scalar tensor attached to the graph, class index or None).
    """
    if logits.ndim != 2 or logits.shape[0] != 1:
        raise ValueError(f"logits: expected (1, n_outputs), got {tuple(logits.shape)}")
    if task == "classification":
        c = int(logits.argmax(dim=1)) if target is None else int(target)
        if not 0 <= c < logits.shape[1]:
            raise ValueError(f"target: class {c} out of range for {logits.shape[1]} outputs")
        return logits[0, c], c
    if task != "survival":
        raise ValueError(f"task: expected classification or survival, got {task!r}")
    if loss == "cox" or logits.shape[1] == 1:
        return logits[0, 0], None
    from ..tasks import risk_from_logits

    return risk_from_logits(logits)[0], None


def _leaf_bag(bag: Bag, dtype: Optional[torch.dtype] = None) -> tuple[Bag, list[Tensor]]:
    """A copy of ``bag`` whose per-slide features are leaf tensors requiring grad (one per slide)."""
    leaves, slides = [], []
    for s in bag.slides:
        x = s.features.detach().to(dtype or s.features.dtype).clone().requires_grad_(True)
        leaves.append(x)
        slides.append(SlideGrid(s.slide_id, x, s.coords, s.stride, s.rows, s.cols, s.shape,
                                patch_size_level0=s.patch_size_level0, meta=s.meta))
    return Bag(bag.bag_id, slides), leaves


def patch_scores(model: torch.nn.Module, bag: Bag, *, method: Union[str, Sequence[str]] = "attention",
                 target: Optional[int] = None, task: str = "classification", loss: Optional[str] = None,
                 model_name: Optional[str] = None) -> dict:
    """Per-patch scores of ``bag`` under ``model`` (put in eval mode for the call, restored after).

    Args:
        method: "attention", "gradient", "both", "auto" (see :func:`resolve_methods`) or a list of them.
        target: class explained by the gradient map (classification; default the predicted class).
        task, loss: what the logits mean (see :func:`target_value`); from the model card.
        model_name: the model's registry name (for "auto").
    Returns:
        {method: (N_total,) float64 numpy array in the bag's patch order} plus "logits": (n_outputs,)
        float64 and "target": the explained class (or None). Memory: one forward (and one backward for
        "gradient") of the bag.
    """
    methods = resolve_methods(method, model_name) if isinstance(method, str) else list(method)
    for m in methods:
        if m not in ("attention", "gradient"):
            raise ValueError(f"method: expected attention or gradient, got {m!r}")
    was_training = model.training
    model.eval()
    out: dict = {}
    try:
        if "gradient" in methods:
            dtype = next((p.dtype for p in model.parameters()), torch.float32)
            gbag, leaves = _leaf_bag(bag, dtype if dtype.is_floating_point else None)
            with torch.enable_grad():
                res = model(gbag)
                value, cls = target_value(res.logits, task=task, loss=loss, target=target)
                grads = torch.autograd.grad(value, leaves, allow_unused=True)
            contrib = [(x * (g if g is not None else torch.zeros_like(x))).sum(dim=1) for x, g in zip(leaves, grads)]
            out["gradient"] = torch.cat(contrib).detach().double().cpu().numpy()
        else:
            with torch.no_grad():
                res = model(bag)
            cls = target_value(res.logits.detach(), task=task, loss=loss, target=target)[1]
        if "attention" in methods:
            out["attention"] = res.scores.detach().double().cpu().numpy().reshape(-1)
        out["logits"] = res.logits.detach().double().cpu().numpy().reshape(-1)
        out["target"] = cls
    finally:
        model.train(was_training)
    n = bag.num_patches
    for m in methods:
        if out[m].shape != (n,):
            raise RuntimeError(f"{type(model).__name__}: {m} scores of shape {out[m].shape} for {n} patches")
    return out


def percentile_normalise(scores) -> np.ndarray:
    """Rank percentiles in (0, 1]: ``rank / N`` with ties given their average rank (CLAM's
    ``percentileofscore(..., kind="rank") / 100``). The highest score maps to 1.

    Raises:
        ValueError for a non-1D input or NaN/inf scores.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"scores: expected a 1D array, got shape {s.shape}")
    if s.size == 0:
        return s.copy()
    if not np.all(np.isfinite(s)):
        raise ValueError(f"scores: {int((~np.isfinite(s)).sum())} of {s.size} scores are NaN or inf")
    order = np.argsort(s, kind="mergesort")
    xs = s[order]
    ranks = np.empty(s.size, np.float64)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(xs) != 0) + 1, [s.size]])
    for a, b in zip(bounds[:-1], bounds[1:]):
        ranks[order[a:b]] = 0.5 * (a + 1 + b)  # average of the 1-based ranks a+1 .. b
    return ranks / s.size


# ------------------------------------------------------------------------------------------------ drawing

def _colormap(cmap):
    import matplotlib

    return matplotlib.colormaps[cmap] if isinstance(cmap, str) else cmap


def patch_pixel_box(coords: np.ndarray, downsample: float, patch_size_level0: int,
                    shape: tuple[int, int]) -> np.ndarray:
    """(N, 4) int pixel boxes ``x0, y0, x1, y1`` (half-open) of the patches on a picture of the slide at
    ``downsample``: the pixels whose centres ``((px + 0.5) * d, (py + 0.5) * d)`` fall inside the patch's
    level-0 square (at least one pixel per patch), clipped to the picture ``shape`` = (h, w)."""
    c = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    d = float(downsample)
    lo = np.ceil(c / d - 0.5)
    hi = np.ceil((c + patch_size_level0) / d - 0.5)
    hi = np.maximum(hi, lo + 1)
    h, w = shape
    box = np.stack([lo[:, 0], lo[:, 1], hi[:, 0], hi[:, 1]], 1)
    box[:, [0, 2]] = np.clip(box[:, [0, 2]], 0, w)
    box[:, [1, 3]] = np.clip(box[:, [1, 3]], 0, h)
    return box.astype(np.int64)


def render_overlay(thumb: np.ndarray, downsample: float, coords, patch_size_level0: int, values01, *,
                   cmap="jet", alpha: float = 0.5) -> np.ndarray:
    """Paint each patch's square on the thumbnail with the colour of its value.

    Args:
        thumb: (h, w, 3) uint8 picture of the slide at level-0 ``downsample`` (level-0 (x, y) at pixel
            (x / d, y / d), as :meth:`Slide.thumbnail` returns).
        coords: (N, 2) level-0 top-left (x, y); patch_size_level0: level-0 side of a patch.
        values01: (N,) values in [0, 1] (e.g. :func:`percentile_normalise`).
        cmap: matplotlib colormap (name or object); alpha: opacity of the colour over the thumbnail.
    Returns:
        (h, w, 3) uint8: ``(1 - alpha) * thumb + alpha * cmap(mean value)`` where patches lie (the mean of
        the values of all patches covering the pixel), the thumbnail unchanged elsewhere. Memory: three
        (h, w) float64 accumulators; time linear in pixels + patches (2D prefix sums, no per-patch loop).
    """
    thumb = np.asarray(thumb)
    if thumb.ndim != 3 or thumb.shape[2] != 3 or thumb.dtype != np.uint8:
        raise ValueError(f"thumb: expected an (h, w, 3) uint8 picture, got {thumb.shape} {thumb.dtype}")
    v = np.asarray(values01, dtype=np.float64).reshape(-1)
    coords = np.asarray(coords).reshape(-1, 2)
    if v.shape[0] != coords.shape[0]:
        raise ValueError(f"values01: {v.shape[0]} values for {coords.shape[0]} patches")
    if v.size and (np.nanmin(v) < 0 or np.nanmax(v) > 1 or not np.all(np.isfinite(v))):
        raise ValueError("values01: expected finite values in [0, 1] (use percentile_normalise)")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: expected a value in [0, 1], got {alpha}")
    if not downsample > 0 or patch_size_level0 <= 0:
        raise ValueError(f"downsample ({downsample}) and patch_size_level0 ({patch_size_level0}) must be positive")
    h, w = thumb.shape[:2]
    box = patch_pixel_box(coords, downsample, patch_size_level0, (h, w))
    keep = (box[:, 2] > box[:, 0]) & (box[:, 3] > box[:, 1])
    box, v = box[keep], v[keep]
    # Sum and count of covering patches per pixel: +-1 at the box corners, then 2D prefix sums.
    acc = np.zeros((2, h + 1, w + 1), np.float64)
    for weight, k in ((v, 0), (np.ones_like(v), 1)):
        np.add.at(acc[k], (box[:, 1], box[:, 0]), weight)
        np.add.at(acc[k], (box[:, 1], box[:, 2]), -weight)
        np.add.at(acc[k], (box[:, 3], box[:, 0]), -weight)
        np.add.at(acc[k], (box[:, 3], box[:, 2]), weight)
    acc = acc.cumsum(axis=1).cumsum(axis=2)[:, :h, :w]
    count = np.rint(acc[1])
    covered = count > 0
    out = thumb.copy()
    if covered.any():
        mean = np.clip(acc[0][covered] / count[covered], 0.0, 1.0)
        colour = _colormap(cmap)(mean)[:, :3] * 255.0
        out[covered] = np.clip(np.rint((1.0 - alpha) * thumb[covered] + alpha * colour), 0, 255).astype(np.uint8)
    return out


def save_heatmap_png(path: PathLike, overlay: np.ndarray, *, cmap="jet", title: str = "",
                     label: str = "score", dpi: int = 200) -> Path:
    """The overlay as a figure: the picture at (about) its own resolution, no axes, a colour bar
    0-100 labelled "<label> (percentile)", an optional title; PNG written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    from ssm2d_nn.fileio import atomic_output

    h, w = overlay.shape[:2]
    # Show the picture near 1:1 (one thumbnail pixel ~ one output pixel) up to ~12 inches wide.
    img_w = min(max(w / dpi, 3.0), 12.0)
    img_h = img_w * h / w
    fig = plt.figure(figsize=(img_w + 1.3, img_h + (0.45 if title else 0.15)), dpi=dpi)
    ax = fig.add_axes([0.02, 0.02, img_w / (img_w + 1.3) - 0.02, (img_h) / (img_h + (0.45 if title else 0.15)) - 0.02])
    ax.imshow(overlay, interpolation="nearest")
    ax.set_axis_off()
    cax = fig.add_axes([img_w / (img_w + 1.3) + 0.02, 0.1, 0.025 * 12 / (img_w + 1.3), 0.75])
    cb = fig.colorbar(ScalarMappable(Normalize(0, 100), _colormap(cmap)), cax=cax)
    cb.set_label(f"{label} (percentile)", fontsize=9)
    cb.ax.tick_params(labelsize=8)
    if title:
        fig.suptitle(title, fontsize=10, y=0.995, va="top")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight", pad_inches=0.05)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ export

def export_scores(csv_path: PathLike, h5_path: PathLike, coords, scores: Mapping[str, np.ndarray]) -> tuple[Path, Path]:
    """Per-patch scores as CSV (``x, y, <method>, <method>_percentile`` per method) and HDF5 (``coords``
    (N, 2) int64, ``<method>`` and ``<method>_percentile`` (N,) float64), both written atomically."""
    import h5py
    import pandas as pd

    from ssm2d_nn.fileio import atomic_output

    coords = np.asarray(coords).reshape(-1, 2).astype(np.int64)
    cols = {"x": coords[:, 0], "y": coords[:, 1]}
    for m, s in scores.items():
        s = np.asarray(s, dtype=np.float64).reshape(-1)
        if s.shape[0] != coords.shape[0]:
            raise ValueError(f"scores[{m!r}]: {s.shape[0]} scores for {coords.shape[0]} patches")
        cols[m] = s
        cols[f"{m}_percentile"] = percentile_normalise(s)
    df = pd.DataFrame(cols)
    csv_path, h5_path = Path(csv_path), Path(h5_path)
    for p in (csv_path, h5_path):
        p.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(csv_path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.10g")
    with atomic_output(h5_path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("coords", data=coords)
        for k in cols:
            if k not in ("x", "y"):
                f.create_dataset(k, data=np.asarray(cols[k], dtype=np.float64))
    return csv_path, h5_path


def export_top_k(slide: Slide, coords, scores, k: int, patch_size_level0: int, patch_size: int,
                 out_dir: PathLike) -> list[Path]:
    """The ``k`` highest-scoring patches read from the slide (level-0 square of ``patch_size_level0``
    at ``patch_size`` px, as the encoder saw it) as ``<rank>_score<score>_x<x>_y<y>.png`` (rank from 1)."""
    from PIL import Image

    from ssm2d_nn.fileio import atomic_output

    coords = np.asarray(coords).reshape(-1, 2)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.shape[0] != coords.shape[0]:
        raise ValueError(f"scores: {s.shape[0]} scores for {coords.shape[0]} patches")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    order = np.argsort(-s, kind="stable")[: max(int(k), 0)]
    paths = []
    for rank, i in enumerate(order, 1):
        x, y = int(coords[i, 0]), int(coords[i, 1])
        img = slide.read_patch(x, y, int(patch_size_level0), int(patch_size))
        p = out_dir / f"{rank:03d}_score{s[i]:.4g}_x{x}_y{y}.png"
        with atomic_output(p) as tmp:
            Image.fromarray(img).save(tmp, format="PNG")
        paths.append(p)
    return paths


# ------------------------------------------------------------------------------------------------ slides

def _root_attr(path: Path, key: str) -> Optional[str]:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            v = f.attrs.get(key)
    except OSError:
        return None
    if isinstance(v, bytes):
        v = v.decode()
    return str(v) if v not in (None, "", "None") else None


def find_slide_file(name: str, slides_dir: Optional[PathLike], *, extensions: Sequence[str] = SLIDE_EXTENSIONS,
                    hint: Optional[str] = None) -> Path:
    """The slide called ``name``: ``hint`` (a recorded path) when it exists, else ``<slides_dir>/<name>.<ext>``
    (or a file of that stem below ``slides_dir``). Raises FileNotFoundError saying where it looked."""
    if hint and Path(hint).is_file():
        return Path(hint)
    looked = [hint] if hint else []
    if slides_dir:
        root = Path(slides_dir)
        if root.is_file():
            if root.stem == name:
                return root
        elif root.is_dir():
            exts = {e.lower().lstrip(".") for e in extensions}
            for e in extensions:
                p = root / f"{name}.{e.lstrip('.')}"
                if p.is_file():
                    return p
            for p in sorted(root.rglob(f"{name}.*")):
                if p.is_file() and p.suffix.lower().lstrip(".") in exts:
                    return p
        looked.append(str(root))
    raise FileNotFoundError(f"slide {name!r}: not found (looked at {', '.join(looked) or 'nothing'}; "
                            f"the features file records no existing slide_path: give the slides folder, --slides)")


@dataclass
class HeatmapReport:
    written: dict = field(default_factory=dict)  # slide -> list of written paths
    failed: dict = field(default_factory=dict)  # features file -> reason
    skipped: dict = field(default_factory=dict)  # features file -> reason (empty slides: no tissue)

    @property
    def ok(self) -> bool:
        return not self.failed


def heatmap_slide(features_file: PathLike, model: torch.nn.Module, card: Mapping, out_dir: PathLike,
                  cfg: Optional[HeatmapConfig] = None, *, slide: Optional[Union[Slide, PathLike]] = None,
                  slides_dir: Optional[PathLike] = None, device: Optional[Union[str, torch.device]] = None,
                  mpp: Optional[float] = None) -> list[Path]:
    """Scores, heatmaps, exports and top-k patches of one slide under ``<out_dir>/<slide>/``.

    Args:
        features_file: TRIDENT features file of the slide.
        model, card: from :func:`ssm2d_path.models.saved.load_trained_model`.
        cfg: heatmap settings (method, target, cmap, alpha, downsample, thumbnail_max_side, top_k).
        slide: the slide (a :class:`Slide` or its path); default the features file's root attribute
            ``slide_path``, else ``<slides_dir>/<name>.<ext>``.
        device: where the model runs (default: the model's).
    Returns:
        The written paths.
    Raises:
        ValueError when the features' dimension is not the model's; FileNotFoundError when the slide is
        not found; SlideFileError / SlideReadError for unreadable files (naming them).
    """
    from ..io import read_slide
    from ..manifest import now, write_json_atomic

    cfg = cfg or HeatmapConfig()
    features_file = Path(features_file)
    grid = read_slide(features_file)
    name = grid.slide_id
    in_dim = int(card.get("in_dim", grid.features.shape[1]))
    if grid.features.shape[1] != in_dim:
        raise ValueError(f"{features_file}: features of dimension {grid.features.shape[1]}, but the model "
                         f"({card.get('path', 'model card')}) was trained on in_dim={in_dim}"
                         + (f" ({card['encoder']} features)" if card.get("encoder") else ""))
    if slide is None:
        slide = find_slide_file(name, slides_dir, hint=_root_attr(features_file, "slide_path"))
    own = not isinstance(slide, Slide)
    sl = open_slide(slide, mpp=mpp) if own else slide
    try:
        dev = torch.device(device) if device is not None else next(model.parameters()).device
        bag = Bag(name, [grid]).to(dev, next(model.parameters()).dtype)
        methods = resolve_methods(cfg.method, card.get("name"))
        res = patch_scores(model, bag, method=methods, target=cfg.target, task=card.get("task", "classification"),
                           loss=card.get("loss"), model_name=card.get("name"))
        psl0 = int(grid.patch_size_level0 or grid.stride)
        patch_size = int(grid.meta.get("patch_size") or psl0)
        thumb, ds = sl.thumbnail(cfg.downsample, max_side=cfg.thumbnail_max_side)
        sdir = Path(out_dir) / name
        sdir.mkdir(parents=True, exist_ok=True)
        written = []
        target = res["target"]
        if card.get("task") == "classification":
            classes = card.get("classes") or [str(i) for i in range(int(card.get("n_outputs", len(res["logits"]))))]
            probs = torch.softmax(torch.as_tensor(res["logits"]), 0).numpy()
            what = f"class {classes[target]}" if target is not None else ""
            pred = {"probabilities": {classes[i]: float(p) for i, p in enumerate(probs)},
                    "predicted": classes[int(probs.argmax())], "explained_class": classes[target]}
        else:
            from ..tasks import risk_from_logits

            lg = torch.as_tensor(res["logits"])[None]
            risk = float(lg[0, 0]) if (card.get("loss") == "cox" or lg.shape[1] == 1) else float(risk_from_logits(lg)[0])
            what, pred = "risk", {"risk": risk}
        for m in methods:
            v = percentile_normalise(res[m])
            over = render_overlay(thumb, ds, grid.coords, psl0, v, cmap=cfg.cmap, alpha=cfg.alpha)
            label = METHOD_LABELS[m] + (f", {what}" if m == "gradient" and what else "")
            title = f"{name}: {card.get('name', 'model')} {m}" + (f" ({what})" if m == "gradient" and what else "")
            written.append(save_heatmap_png(sdir / f"heatmap_{m}.png", over, cmap=cfg.cmap, title=title, label=label))
        scores = {m: res[m] for m in methods}
        written += list(export_scores(sdir / "scores.csv", sdir / "scores.h5", grid.coords, scores))
        if cfg.top_k > 0:
            written += export_top_k(sl, grid.coords, res[methods[0]], cfg.top_k, psl0, patch_size, sdir / "top_k")
        info = {"slide": name, "slide_path": str(sl.path), "features_file": str(features_file),
                "model": card.get("name"), "model_card": card.get("path"), "task": card.get("task"),
                "methods": methods, "top_k_by": methods[0], "n_patches": int(grid.num_patches),
                "patch_size_level0": psl0, "thumbnail_downsample": ds, "thumbnail_size": list(thumb.shape[:2]),
                "cmap": cfg.cmap, "alpha": cfg.alpha, "normalisation": "rank percentile (ties averaged)",
                "prediction": pred, "written": now()}
        written.append(write_json_atomic(sdir / "heatmap.json", info))
        return written
    finally:
        if own:
            sl.close()


def feature_files_in(path: PathLike) -> list[Path]:
    """A features file, or the ``.h5`` files of a folder (sorted). Raises FileNotFoundError."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in (".h5", ".hdf5"))
        if files:
            return files
        raise FileNotFoundError(f"features: no .h5 feature files in {p}")
    raise FileNotFoundError(f"features: {p} does not exist")


def heatmap_slides(features_files: Sequence[PathLike], model: torch.nn.Module, card: Mapping, out_dir: PathLike,
                   cfg: Optional[HeatmapConfig] = None, *, slides_dir: Optional[PathLike] = None,
                   mpp: Optional[float] = None, progress: bool = True) -> HeatmapReport:
    """:func:`heatmap_slide` for every file with a progress bar; a failing slide is logged and reported
    in ``failed`` (file -> reason) and the others go on; empty slides (no tissue) are listed in ``skipped``."""
    from .._progress import progress_bar

    from ..io import EmptySlideError, SlideFileError

    report = HeatmapReport()
    for f in progress_bar(list(features_files), desc="heatmap", unit="slide", enabled=progress):
        try:
            paths = heatmap_slide(f, model, card, out_dir, cfg, slides_dir=slides_dir, mpp=mpp)
        except EmptySlideError as e:
            report.skipped[str(f)] = str(e)
            continue
        except (SlideFileError, FileNotFoundError, ValueError, OSError, RuntimeError) as e:
            log.warning("heatmap of %s failed: %s", f, e)
            report.failed[str(f)] = f"{type(e).__name__}: {e}"
            continue
        report.written[Path(paths[0]).parent.name] = paths
    return report
