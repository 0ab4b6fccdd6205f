"""Patch features of whole slides: patches files in, TRIDENT features files out.

For every ``<job_dir>/<grid>/patches/<slide>_patches.h5`` (see :mod:`.coords`) the slide's patches
are read (DataLoader worker processes, each with its own OpenSlide handle), preprocessed with the
encoder's own transform, encoded in batches (bf16 autocast on GPU) and written to
``<job_dir>/<grid>/features_<name>/<slide>.h5`` with :func:`ssm2d_path.io.write_trident`.

* Atomic: features are written under a temporary name and renamed when complete, so a crash
  mid-slide leaves no file that looks finished.
* Resumable: a slide whose features file exists with the patches file's coordinates is skipped.
* Sharded: under ``torchrun`` each rank takes ``sorted(files)[rank::world_size]``; the counts are
  all-reduced at the end so rank 0 reports the total throughput.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..__about__ import __version__
from ..io.errors import SlideFileError
from .coords import PatchGrid, read_coords
from .encoder import Encoder, build_encoder, encoder_name
from .settings import SLIDE_EXTENSIONS, ExtractConfig
from .slide import Slide, open_slide

__all__ = ["ExtractReport", "PatchDataset", "extract_slide", "extract_slides", "features_path", "find_slide",
           "resolve_precision", "shard"]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class ExtractReport:
    """What :func:`extract_slides` did.

    ``written``, ``skipped`` (features already there) and ``failed`` (patches file -> reason) are
    this rank's; ``patches`` (encoded patches), ``seconds`` (encoding + writing wall time, the slowest
    rank's) and ``patches_per_s`` are totals over all ranks, as are the ``n_*`` counts.
    """

    written: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    failed: dict = field(default_factory=dict)
    patches: int = 0
    seconds: float = 0.0
    patches_per_s: float = 0.0
    n_written: int = 0
    n_skipped: int = 0
    n_failed: int = 0
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    precision: str = "fp32"


class PatchDataset(Dataset):
    """The patches of one slide: item i is (transform(patch i) (3, H, W) float, i).

    The :class:`Slide` is pickled without its OpenSlide handle, so each DataLoader worker opens its own.
    """

    def __init__(self, slide: Slide, grid: PatchGrid, transform):
        self.slide = slide
        self.coords = np.asarray(grid.coords, dtype=np.int64)
        self.size_level0 = int(grid.patch_size_level0)
        self.size = int(grid.patch_size)
        self.transform = transform

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    def __getitem__(self, i: int):
        from PIL import Image

        x, y = (int(v) for v in self.coords[i])
        rgb = self.slide.read_patch(x, y, self.size_level0, self.size)
        return self.transform(Image.fromarray(rgb)), i


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on CUDA, ``fp32`` elsewhere; other values are checked and returned."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in _DTYPES:
        raise ValueError(f"precision: expected 'auto', 'bf16', 'fp16' or 'fp32', got {precision!r}")
    return precision


def extract_slide(encoder: Encoder, grid: PatchGrid, slide: Slide, *, device: Union[str, torch.device] = "cpu",
                  precision: str = "auto", batch_size: int = 64, num_workers: int = 0,
                  progress=None) -> np.ndarray:
    """Encode every patch of ``grid`` read from ``slide``.

    Args:
        encoder: from :func:`build_encoder`; its model must already be on ``device``.
        grid: the patches (level-0 top-left coords, patch size at level 0 and at the target resolution).
        device: where the model runs; precision: ``auto`` (bf16 autocast on CUDA, fp32 on CPU),
            ``bf16``, ``fp16`` or ``fp32``.
        num_workers: patch-reading worker processes (0: read in this process).
        progress: a tqdm bar advanced by the patches encoded (None: no bar).
    Returns:
        (N, D) float32 features in the order of ``grid.coords``; (0, D) for an empty grid.
        Memory: N * D * 4 bytes plus a batch and ``4 * num_workers`` read chunks (:func:`read_chunk_size`)
        of preprocessed patches in flight.
    """
    device = torch.device(device)
    prec = resolve_precision(precision, device)
    n = grid.num_patches
    out = np.empty((n, encoder.feature_dim), dtype=np.float32)
    if n == 0:
        return out
    ds = PatchDataset(slide, grid, encoder.transform)
    # Workers hand over small chunks, not whole model batches: with batch-sized items a slide of a few
    # hundred patches would keep only a few of the workers busy (the reading, not the GPU, is the limit).
    chunk = read_chunk_size(n, batch_size, num_workers)
    loader = DataLoader(ds, batch_size=chunk, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda", drop_last=False,
                        prefetch_factor=4 if num_workers > 0 else None)
    use_autocast = prec != "fp32"

    def encode(xs: list, idxs: list) -> None:
        x = (xs[0] if len(xs) == 1 else torch.cat(xs)).to(device, non_blocking=True)
        idx = idxs[0] if len(idxs) == 1 else torch.cat(idxs)
        f = encoder.model(x)
        if f.ndim != 2 or f.shape[1] != encoder.feature_dim:
            raise RuntimeError(f"encoder {encoder.arch} returned shape {tuple(f.shape)}, expected "
                               f"({x.shape[0]}, {encoder.feature_dim})")
        out[idx.numpy()] = f.float().cpu().numpy()
        if progress is not None:
            progress.update(int(x.shape[0]))

    with torch.inference_mode(), torch.autocast(device.type, dtype=_DTYPES[prec], enabled=use_autocast):
        xs, idxs, pending = [], [], 0
        for x, idx in loader:
            xs.append(x)
            idxs.append(idx)
            pending += int(idx.shape[0])
            if pending >= batch_size:
                encode(xs, idxs)
                xs, idxs, pending = [], [], 0
        if xs:
            encode(xs, idxs)
    return out


def read_chunk_size(n: int, batch_size: int, num_workers: int) -> int:
    """Patches per worker item: about four items per worker for the slide, at most 64, at most a batch."""
    if num_workers <= 0:
        return batch_size
    return max(1, min(batch_size, 64, -(-n // (4 * num_workers))))


def features_path(job_dir: PathLike, grid: PatchGrid, name: str) -> Path:
    """``<job_dir>/<grid.folder()>/features_<name>/<slide>.h5``."""
    return Path(job_dir) / grid.folder() / f"features_{name}" / f"{grid.name}.h5"


def find_slide(grid: PatchGrid, patches_file: PathLike, slides_dir: Optional[PathLike] = None,
               extensions: Sequence[str] = SLIDE_EXTENSIONS) -> Path:
    """The slide of a patches file: ``grid.slide_path`` when it exists, else ``<slides_dir>/<name>.<ext>``
    (then anywhere below ``slides_dir``). Raises SlideFileError naming the patches file, the recorded
    path and the folder searched."""
    if grid.slide_path and Path(grid.slide_path).is_file():
        return Path(grid.slide_path)
    exts = {e.lower().lstrip(".") for e in extensions}
    if slides_dir is not None:
        root = Path(slides_dir)
        if root.is_file() and root.stem == grid.name:
            return root
        if root.is_dir():
            for finder in (root.glob, root.rglob):
                hits = sorted(p for p in finder(f"{grid.name}.*")
                              if p.is_file() and p.suffix.lower().lstrip(".") in exts)
                if hits:
                    return hits[0]
    where = f"not found in {slides_dir}" if slides_dir is not None else "no slides folder given (--slides)"
    raise SlideFileError(f"{patches_file}: slide {grid.name!r} not found: recorded slide_path "
                         f"{grid.slide_path or '(none)'!r} does not exist and {where}")


def _coords_match(path: Path, coords: np.ndarray) -> tuple[bool, str]:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "features" not in f or "coords" not in f:
                return False, "it lacks 'features' or 'coords'"
            have = np.asarray(f["coords"][()]).reshape(-1, 2)
            nfeat = f["features"].shape[0]
    except (OSError, ValueError, KeyError) as e:
        return False, f"it cannot be read ({e})"
    if have.shape != coords.shape or nfeat != coords.shape[0] or not np.array_equal(have, coords):
        return False, f"its coordinates ({have.shape[0]} patches) differ from the patches file's ({coords.shape[0]})"
    return True, ""


def shard(items: Iterable, rank: int, world_size: int) -> list:
    """``sorted(items)[rank::world_size]``: disjoint shards that together cover every item."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank: expected 0 <= rank < world_size ({world_size}), got {rank}")
    return sorted(items)[rank::world_size]


def _dist_env(rank: Optional[int], world_size: Optional[int]) -> tuple[int, int, int, bool]:
    """(rank, world_size, local_rank, from_env). Explicit arguments win over torchrun's environment."""
    if rank is not None or world_size is not None:
        r, w = int(rank or 0), int(world_size or 1)
        return r, w, int(os.environ.get("LOCAL_RANK", r)) if w > 1 else 0, False
    r, w = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return r, w, int(os.environ.get("LOCAL_RANK", 0)), True


def _device(spec: str, local_rank: int) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device: 'cuda' requested but CUDA is not available")
        return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    if spec == "cpu" or spec.startswith("cuda:"):
        return torch.device(spec)
    raise ValueError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:<i>', got {spec!r}")


def _remove_stale_temps(dest: Path) -> None:
    """Temporary files of an earlier run killed while writing this slide (never complete files)."""
    if dest.parent.is_dir():
        for p in dest.parent.glob(f".{dest.name}.*.tmp"):
            try:
                p.unlink()
            except OSError:
                pass


def extract_slides(patch_files: Sequence[PathLike], job_dir: PathLike, cfg: ExtractConfig, *,
                   slides_dir: Optional[PathLike] = None, mpp: Optional[float] = None,
                   rank: Optional[int] = None, world_size: Optional[int] = None, progress: bool = True,
                   encoder: Optional[Encoder] = None) -> ExtractReport:
    """Write a TRIDENT features file for every patches file (this rank's shard of them).

    Args:
        patch_files: ``<slide>_patches.h5`` files (:func:`~ssm2d_path.wsi.coords.write_coords`).
        job_dir: outputs go to ``<job_dir>/<grid>/features_<name>/<slide>.h5``.
        cfg: encoder, weights, batch size, workers, device, precision, overwrite.
        slides_dir: where to look for a slide whose recorded ``slide_path`` does not exist.
        mpp: level-0 micrometres per pixel for slides that record none.
        rank, world_size: this process's shard (default: torchrun's ``RANK``/``WORLD_SIZE``, else 0/1).
            When taken from torchrun's environment with ``WORLD_SIZE > 1``, a process group (nccl on
            CUDA, gloo on CPU) is created to all-reduce the totals, and destroyed at the end.
        progress: a tqdm bar (unit "patch", rate = patches/s) on rank 0.
        encoder: an already built encoder (default: built from ``cfg`` when a slide needs it).
    Returns:
        :class:`ExtractReport`. Per-slide failures (unreadable patches file, slide not found, read
        errors, ...) are recorded in ``failed`` and the other slides go on.
    Raises:
        ValueError from :func:`build_encoder` (unknown model, weights that do not fit), before any slide.
    """
    from .._progress import progress_bar

    cfg.check()
    r, w, local_rank, from_env = _dist_env(rank, world_size)
    device = _device(cfg.device, local_rank)
    prec = resolve_precision(cfg.precision, device)
    name = encoder.name if encoder is not None else encoder_name(cfg)
    mine = shard([str(Path(p)) for p in patch_files], r, w)
    report = ExtractReport(rank=r, world_size=w, device=str(device), precision=prec)

    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL and pinned memory use the current device
    own_group = False
    if from_env and w > 1 and torch.distributed.is_available():
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            own_group = True

    grids: dict[str, PatchGrid] = {}
    for pf in mine:
        try:
            grids[pf] = read_coords(pf)
        except SlideFileError as e:
            report.failed[pf] = str(e)
    bar = progress_bar(total=sum(g.num_patches for g in grids.values()), unit="patch",
                       desc=f"extract[{r}/{w}]" if w > 1 else "extract", dynamic_ncols=True,
                       enabled=progress and r == 0, position=0)
    local_patches, seconds = 0, 0.0
    try:
        for pf, grid in grids.items():
            dest = features_path(job_dir, grid, name)
            bar.set_postfix_str(grid.name, refresh=False)
            if dest.exists() and not cfg.overwrite:
                same, why = _coords_match(dest, grid.coords)
                if same:
                    report.skipped.append(dest)
                    bar.total -= grid.num_patches  # the rate counts encoded patches only
                    bar.refresh()
                    continue
                logger.warning("%s: extracting again because %s", dest, why)
            if encoder is None:  # here, not per slide: a bad name or weights file fails every slide alike
                encoder = build_encoder(cfg)
            if next(encoder.model.parameters()).device != device:
                encoder.model.to(device)
            try:
                slide_path = find_slide(grid, pf, slides_dir)
                t0 = time.perf_counter()
                with open_slide(slide_path, mpp=mpp) as slide:
                    if grid.level0_width and tuple(slide.dimensions) != (grid.level0_width, grid.level0_height):
                        raise SlideFileError(
                            f"{pf}: the patches were planned on a {grid.level0_width}x{grid.level0_height} slide, "
                            f"but {slide_path} is {slide.dimensions[0]}x{slide.dimensions[1]}")
                    feats = extract_slide(encoder, grid, slide, device=device, precision=prec,
                                          batch_size=cfg.batch_size, num_workers=cfg.num_workers, progress=bar)
                _remove_stale_temps(dest)
                _write(dest, feats, grid, encoder, slide_path=slide_path, patches_file=pf, precision=prec)
                seconds += time.perf_counter() - t0
                local_patches += grid.num_patches
                report.written.append(dest)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # one bad slide must not stop the batch
                msg = str(e) if str(pf) in str(e) else f"{pf}: {type(e).__name__}: {e}"
                report.failed[pf] = msg
                logger.error("FAILED %s", msg)
    finally:
        bar.close()

    totals = [float(len(report.written)), float(len(report.skipped)), float(len(report.failed)),
              float(local_patches), seconds]
    if w > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        import torch.distributed as dist

        dev = device if dist.get_backend() == "nccl" else torch.device("cpu")
        counts = torch.tensor(totals[:4], dtype=torch.float64, device=dev)
        secs = torch.tensor([seconds], dtype=torch.float64, device=dev)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        dist.all_reduce(secs, op=dist.ReduceOp.MAX)
        totals = counts.cpu().tolist() + secs.cpu().tolist()
        if own_group:
            dist.destroy_process_group()
    report.n_written, report.n_skipped, report.n_failed = (int(v) for v in totals[:3])
    report.patches, report.seconds = int(totals[3]), float(totals[4])
    report.patches_per_s = report.patches / report.seconds if report.seconds > 0 else 0.0
    return report


def _write(dest: Path, feats: np.ndarray, grid: PatchGrid, encoder: Encoder, *, slide_path: Path,
           patches_file: PathLike, precision: str) -> Path:
    from ..io.trident import write_trident

    attrs = {"slide_path": str(Path(slide_path).resolve()), "patches_file": str(Path(patches_file).resolve()),
             "precision": precision, "extractor": f"ssm2d-path {__version__}", "ssm2d_path_version": __version__,
             "mpp": float(grid.mpp), "target_mpp": float(grid.target_mpp), "stride_level0": int(grid.stride_level0),
             **encoder.provenance()}
    return write_trident(dest, feats, grid.coords, patch_size=grid.patch_size,
                         patch_size_level0=grid.patch_size_level0,
                         level0_magnification=grid.level0_magnification,
                         target_magnification=grid.target_magnification, overlap=grid.overlap,
                         level0_width=grid.level0_width, level0_height=grid.level0_height,
                         encoder=encoder.name, name=grid.name, extra_attrs=attrs)
