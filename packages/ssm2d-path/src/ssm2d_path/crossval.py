"""k-fold cross-validation: one :class:`~ssm2d_path.train.Trainer` per split, each in ``<out>/fold_<i>``.

On the CPU (or one GPU) folds run one after another. With several CUDA GPUs folds run in parallel, one
process per GPU (``torch.multiprocessing`` spawn, a queue of folds, each process pinned to its GPU).
A fold whose ``results.json`` exists is skipped on a re-run; a fold with a checkpoint resumes. A fold that
fails is reported with its traceback (also in ``fold_<i>/error.txt``) and the others go on; the caller
gets the failures and should exit non-zero. Results are aggregated into ``results.csv`` / ``results.md``
(mean +- std over folds) and ``results_folds.csv`` in the output folder, next to ``manifest.json``.
"""

from __future__ import annotations

import json
import logging
import os
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from .config import Config
from .manifest import now, write_json_atomic, write_manifest
from .tasks import Task, build_task
from .train import RESULTS_FILE, SplitView, Trainer, resolve_device, seed_everything

__all__ = ["CrossvalResult", "build_dataset", "crossval", "fold_row", "load_splits", "run_fold", "task_for"]

log = logging.getLogger(__name__)


@dataclass
class CrossvalResult:
    rows: list[dict] = field(default_factory=list)
    failures: dict[int, str] = field(default_factory=dict)  # fold -> traceback
    markdown: str = ""
    out_dir: Optional[Path] = None

    @property
    def ok(self) -> bool:
        return not self.failures


def build_dataset(cfg: Config):
    """(LabelTable, BagDataset) from ``cfg.data``."""
    from .data import BagDataset, LabelTable

    d = cfg.data
    if not d.label_csv or not d.feature_dir:
        raise ValueError("data.label_csv and data.feature_dir are required")
    table = LabelTable.read(d.label_csv, task=d.task, label_col=d.label_col, time_col=d.time_col,
                            censorship_col=d.censorship_col, event_col=d.event_col, label_map=d.label_map)
    ds = BagDataset(d.feature_dir, table, level=d.level, fmt=d.format, patches_dir=d.patches_dir)
    if len(ds) == 0:
        raise ValueError(f"data.feature_dir {d.feature_dir!r}: no bag of the label table has a feature file")
    return table, ds


def load_splits(cfg: Config, table, out_dir: Optional[Path] = None):
    """Splits from ``data.split_dir`` when it holds ``splits_*.csv``, else made from the table
    (``data.k``, ``data.seed``, ``data.val_fraction``, ``data.level``) and written to ``<out>/splits``.
    Returns (splits, split files)."""
    from .data import make_splits, read_splits, write_splits

    d = cfg.data
    if d.split_dir:
        files = sorted(Path(d.split_dir).glob("splits_*.csv"), key=lambda p: int(p.stem.split("_")[-1]))
        if files:
            return read_splits(d.split_dir), files
    splits = make_splits(table, k=d.k, seed=d.seed, val_fraction=d.val_fraction, level=d.level)
    target = Path(d.split_dir) if d.split_dir else Path(out_dir or cfg.output.dir) / "splits"
    write_splits(target, splits)
    files = sorted(target.glob("splits_*.csv"), key=lambda p: int(p.stem.split("_")[-1]))
    return splits, files


def task_for(cfg: Config, table, dataset) -> Task:
    """The task; survival bin edges computed once on every bag of the dataset (the whole cohort)."""
    d, t = cfg.data, cfg.train
    if d.task == "classification":
        return build_task("classification", n_classes=len(table.classes), class_names=table.classes)
    # One (time, censorship) per patient, as the field computes the bins.
    cases = list(dataset.ids) if d.level == "patient" else list(dict.fromkeys(table.case_of(s) for s in dataset.ids))
    surv = [table.survival_of(c, level="patient") for c in cases]
    return build_task("survival", times=[s[0] for s in surv], censorship=[s[1] for s in surv], n_bins=d.n_bins,
                      alpha=t.alpha, loss=t.loss)


def fold_row(fold: int, results: dict) -> dict:
    row = {"fold": fold, "reported_epoch": results.get("reported_epoch")}
    for part in ("test", "val"):
        for k, v in (results.get(part) or {}).items():
            row[f"{part}_{k}"] = v
    return row


def run_fold(cfg: Config, fold: int, split, dataset, task: Task, *, out_dir: Path, device=None,
             callbacks: Sequence = (), feature_files: Sequence = (), label_files: Sequence = (),
             split_files: Sequence = (), model_factory=None) -> dict:
    """Train and evaluate one split in ``out_dir/fold_<fold>``; skip when its results exist.

    ``model_factory(name, in_dim, n_outputs, **kwargs)`` builds the model (default
    :func:`ssm2d_path.models.build_model`)."""
    if model_factory is None:
        from .models import build_model as model_factory

    fold_dir = Path(out_dir) / f"fold_{fold}"
    done = fold_dir / RESULTS_FILE
    if done.is_file():
        log.info("fold %d: %s exists, skipped", fold, done)
        if not (fold_dir / "model.json").is_file() and (fold_dir / "model.pt").is_file():
            _write_card(fold_dir, cfg, dataset, task, fold)  # a run from before model cards existed
        return json.loads(done.read_text())
    start = now()
    device = torch.device(device) if device is not None else resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    model = model_factory(cfg.model.name, dataset.feature_dim, task.n_outputs, **cfg.model.kwargs)
    trainer = Trainer(model, task, SplitView(dataset, split.train), SplitView(dataset, split.val),
                      SplitView(dataset, split.test), cfg=cfg.train, out_dir=fold_dir,
                      selection=cfg.resolved_selection(), device=device, callbacks=callbacks)
    results = trainer.fit(resume=True)
    _write_card(fold_dir, cfg, dataset, task, fold)
    write_manifest(fold_dir, config=cfg.to_dict(), device=device,
                   seeds={"train": cfg.train.seed, "splits": cfg.data.seed}, scan_backend=results.get("scan_backend"),
                   label_files=label_files, split_files=split_files, feature_files=feature_files, start=start,
                   extra={"fold": fold, "selection": results["selection"],
                          "reported_epoch": results["reported_epoch"]})
    return results


def _encoder_of(dataset) -> Optional[str]:
    """The encoder's name from the dataset's first feature file (its ``encoder`` attribute, else a
    TRIDENT ``features_<encoder>`` folder name), or None."""
    files = _feature_files(dataset)
    if not files:
        return None
    first = Path(files[0])
    try:
        import h5py

        with h5py.File(first, "r") as f:
            enc = f["features"].attrs.get("encoder") if "features" in f else None
        if isinstance(enc, bytes):
            enc = enc.decode()
        if enc:
            return str(enc)
    except (OSError, ValueError):
        pass
    return first.parent.name[len("features_"):] if first.parent.name.startswith("features_") else None


def _write_card(fold_dir: Path, cfg: Config, dataset, task: Task, fold: int) -> None:
    """model.json next to model.pt: what :func:`ssm2d_path.models.saved.load_trained_model` needs."""
    from .models.saved import write_model_card

    edges = getattr(task, "edges", None)
    write_model_card(fold_dir, name=cfg.model.name, kwargs=cfg.model.kwargs, in_dim=int(dataset.feature_dim),
                     n_outputs=int(task.n_outputs), task=task.kind,
                     classes=getattr(task, "class_names", None) if task.kind == "classification" else None,
                     n_bins=getattr(task, "n_bins", None), encoder=_encoder_of(dataset),
                     loss=getattr(task, "loss_name", None),
                     edges=None if edges is None else [float(e) for e in edges],
                     extra={"fold": fold, "level": cfg.data.level})


def _feature_files(dataset) -> list:
    files = getattr(dataset, "files", None) or {}
    out = []
    for paths in files.values():
        out.extend(paths if isinstance(paths, (list, tuple)) else [paths])
    return sorted(set(map(str, out)))


def _gpu_worker(gpu: int, cfg: Config, dataset, task, splits, out_dir, files, model_factory, jobs, results) -> None:
    torch.cuda.set_device(gpu)
    if dataset is None:
        _, dataset = build_dataset(cfg)
    while True:
        fold = jobs.get()
        if fold is None:
            return
        try:
            res = run_fold(cfg, fold, splits[fold], dataset, task, out_dir=out_dir, device=f"cuda:{gpu}",
                           model_factory=model_factory, **files)
            results.put((fold, res, None))
        except Exception:  # noqa: BLE001 - reported to the parent, the other folds go on
            results.put((fold, None, traceback.format_exc()))


def crossval(cfg: Config, *, dataset=None, table=None, splits=None, task: Optional[Task] = None,
             folds: Optional[Sequence[int]] = None, devices: Optional[Sequence[int]] = None,
             split_files: Sequence = (), label_files: Sequence = (), callbacks: Sequence = (),
             model_factory=None) -> CrossvalResult:
    """Run the folds of ``cfg`` and aggregate the table.

    Args:
        cfg: the validated config.
        dataset, table: already-built data (default: from ``cfg.data``).
        splits: list of splits with ``train``/``val``/``test`` id lists (default: :func:`load_splits`).
        task: default :func:`task_for`.
        folds: which folds to run (default all).
        devices: CUDA device indices for parallel folds (default: every visible GPU when
            ``train.device`` is auto/cuda and more than one exists; otherwise sequential).
        model_factory: see :func:`run_fold` (must be picklable for parallel folds).
    """
    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    start = now()
    built_here = dataset is None
    if dataset is None:
        table, dataset = build_dataset(cfg)
        label_files = [cfg.data.label_csv]
    if splits is None:
        splits, split_files = load_splits(cfg, table, out)
    if task is None:
        task = task_for(cfg, table, dataset)
    folds = list(range(len(splits))) if folds is None else list(folds)
    for f in folds:
        if not 0 <= f < len(splits):
            raise ValueError(f"fold {f} does not exist ({len(splits)} splits)")
    files = {"feature_files": _feature_files(dataset), "label_files": list(label_files),
             "split_files": list(split_files)}
    if devices is None and cfg.train.device in ("auto", "cuda") and torch.cuda.is_available() \
            and torch.cuda.device_count() > 1:
        devices = list(range(torch.cuda.device_count()))
    result = CrossvalResult(out_dir=out)
    done: dict[int, dict] = {}
    if devices and len(devices) > 1 and len(folds) > 1:
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        jobs, results = ctx.Queue(), ctx.Queue()
        for f in folds:
            jobs.put(f)
        workers = min(len(devices), len(folds))
        for _ in range(workers):
            jobs.put(None)
        # Workers rebuild the dataset from the config (it holds file handles) unless it was given in memory.
        procs = [ctx.Process(target=_gpu_worker, args=(devices[i], cfg, None if built_here else dataset, task,
                                                       splits, out, files, model_factory, jobs, results),
                             daemon=False)
                 for i in range(workers)]
        for p in procs:
            p.start()
        for _ in folds:
            fold, res, tb = results.get()
            if tb is None:
                done[fold] = res
            else:
                result.failures[fold] = tb
        for p in procs:
            p.join()
    else:
        device = resolve_device(cfg.train.device)
        for f in folds:
            try:
                done[f] = run_fold(cfg, f, splits[f], dataset, task, out_dir=out, device=device,
                                   callbacks=callbacks, model_factory=model_factory, **files)
            except Exception:  # noqa: BLE001 - reported, the other folds go on
                result.failures[f] = traceback.format_exc()
    for f, tb in sorted(result.failures.items()):
        fold_dir = out / f"fold_{f}"
        fold_dir.mkdir(parents=True, exist_ok=True)
        (fold_dir / "error.txt").write_text(tb)
        log.error("fold %d failed:\n%s", f, tb)
    result.rows = [fold_row(f, done[f]) for f in sorted(done)]
    if result.rows:
        from .metrics import write_results_table

        _, _, result.markdown = write_results_table(result.rows, out)
    parallel = bool(devices) and len(devices) > 1 and len(folds) > 1
    write_manifest(out, config=cfg.to_dict(),
                   device=torch.device("cuda", devices[0]) if parallel else resolve_device(cfg.train.device),
                   seeds={"train": cfg.train.seed, "splits": cfg.data.seed},
                   scan_backend=next((done[f].get("scan_backend") for f in sorted(done)), None),
                   start=start, extra={"folds": folds, "failed_folds": sorted(result.failures),
                                       "gpus": list(devices) if parallel else None}, **files)
    return result
