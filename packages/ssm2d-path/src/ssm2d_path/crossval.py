"""k-fold cross-validation: one :class:`~ssm2d_path.train.Trainer` per split, each in ``<out>/fold_<i>``.

Everything is checked before any fold trains: the device, the model's arguments (the model is built
once), every feature file of the cohort (read once; the unusable ones listed together in one error, or
left out and recorded when ``data.skip_bad_files``), the splits (``data.k`` files, every patient in
exactly one test fold), and the output folder (:func:`ssm2d_path.runstate.plan_folds`): a fold made with
this configuration is skipped when finished and resumed when interrupted, a fold made with another one
is refused with the differing keys unless ``overwrite``. What happens to each fold is printed.

On the CPU (or one GPU) folds run one after another. With several CUDA GPUs folds run in parallel, one
process per GPU (``torch.multiprocessing`` spawn, a queue of folds, each process pinned to its GPU).
A fold that fails is reported (its traceback in ``fold_<i>/error.txt``) and the others go on; the caller
gets the failures and should exit non-zero. The table (``results.csv`` / ``results.md``, mean +- std, and
``results_folds.csv``) is built from every finished fold on disk, whatever subset ran this time, next to
``manifest.json``.
"""

from __future__ import annotations

import json
import logging
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from ssm2d_nn.fileio import atomic_output

from .config import Config, ConfigError
from .manifest import now, write_manifest
from .runstate import (FoldPlan, RunConflictError, config_diff, describe_diff, finished_folds, fingerprint,
                       fold_run_config, plan_folds, run_config)
from .tasks import Task, build_task
from .train import RESULTS_FILE, SplitView, Trainer, check_device, resolve_device, seed_everything

__all__ = ["CrossvalResult", "build_dataset", "crossval", "fold_row", "load_splits", "run_fold", "task_for"]

log = logging.getLogger(__name__)


@dataclass
class CrossvalResult:
    rows: list[dict] = field(default_factory=list)
    failures: dict[int, str] = field(default_factory=dict)  # fold -> traceback
    markdown: str = ""
    out_dir: Optional[Path] = None
    plan: Optional[FoldPlan] = None
    skipped_slides: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def build_dataset(cfg: Config, *, validate: bool = True):
    """(LabelTable, BagDataset) from ``cfg.data``. With ``validate`` every feature file is read once
    and checked (including ``data.max_grid_cells``); unusable files raise one
    :class:`~ssm2d_path.data.CohortError` listing them all, or, with ``data.skip_bad_files``, are left
    out and listed in ``dataset.skipped``."""
    from .data import BagDataset, LabelTable

    d = cfg.data
    if not d.label_csv or not d.feature_dir:
        raise ValueError("data.label_csv and data.feature_dir are required")
    table = LabelTable.read(d.label_csv, task=d.task, label_col=d.label_col, time_col=d.time_col,
                            censorship_col=d.censorship_col, event_col=d.event_col, label_map=d.label_map)
    ds = BagDataset(d.feature_dir, table, level=d.level, fmt=d.format, patches_dir=d.patches_dir,
                    strict=not d.skip_bad_files, validate=validate, max_cells=d.max_grid_cells)
    if len(ds) == 0:
        raise ValueError(f"data.feature_dir {d.feature_dir!r}: no bag of the label table has a usable feature file")
    return table, ds


def _resolve_splits(cfg: Config, table, out_dir: Optional[Path], ids=None):
    """(splits, split files, folder to write them to or None). Read from ``data.split_dir`` when it holds
    split files (exactly ``data.k`` of them, every patient tested exactly once), else made."""
    from .data import check_splits, make_splits, read_splits, split_files

    d = cfg.data
    if d.split_dir and split_files(d.split_dir):
        splits = read_splits(d.split_dir, k=d.k)
        check_splits(splits, table, level=d.level, where=f"data.split_dir {d.split_dir}", ids=ids)
        return splits, split_files(d.split_dir), None
    splits = make_splits(table, k=d.k, seed=d.seed, val_fraction=d.val_fraction, level=d.level)
    target = Path(d.split_dir) if d.split_dir else Path(out_dir or cfg.output.dir) / "splits"
    return splits, [], target


def _write_pending(cfg: Config, splits, target: Path) -> list:
    from .data import write_splits

    # The run's own <out>/splits follows the run (its folds were checked); a user's split_dir is empty here.
    return write_splits(target, splits, overwrite=not cfg.data.split_dir)


def load_splits(cfg: Config, table, out_dir: Optional[Path] = None, *, ids=None):
    """Splits from ``data.split_dir`` when it holds ``splits_*.csv`` (exactly ``data.k`` files; every
    patient, of ``ids`` when given, in exactly one test fold), else made from the table (``data.k``,
    ``data.seed``, ``data.val_fraction``, ``data.level``) and written to ``data.split_dir`` or
    ``<out>/splits``. Returns (splits, split files)."""
    splits, files, target = _resolve_splits(cfg, table, out_dir, ids)
    if target is not None:
        files = _write_pending(cfg, splits, target)
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
             split_files: Sequence = (), model_factory=None, fold_config: Optional[dict] = None,
             record: Optional[dict] = None) -> dict:
    """Train and evaluate one split in ``out_dir/fold_<fold>``; skip when its results exist.

    ``model_factory(name, in_dim, n_outputs, **kwargs)`` builds the model (default
    :func:`ssm2d_path.models.build_model`). ``fold_config``: the fold's run config (default from ``cfg``,
    see :func:`ssm2d_path.runstate.fold_run_config`); results or a checkpoint of another one raise
    :class:`~ssm2d_path.runstate.RunConflictError`. ``record``: further entries for ``results.json``."""
    if model_factory is None:
        from .models import build_model as model_factory

    if fold_config is None:
        base = run_config(cfg, feature_dim=getattr(dataset, "feature_dim", None), label_files=label_files)
        fold_config = fold_run_config(base, fold, split, getattr(dataset, "ids", None))
    fold_dir = Path(out_dir) / f"fold_{fold}"
    done = fold_dir / RESULTS_FILE
    if done.is_file():
        results = json.loads(done.read_text())
        if results.get("fingerprint") != fingerprint(fold_config):
            diff = config_diff(results.get("run_config"), fold_config)
            why = describe_diff(diff) if results.get("fingerprint") else "no fingerprint recorded"
            raise RunConflictError(f"{fold_dir} holds results of another configuration ({why or 'fingerprint differs'}); "
                                   f"use another output.dir or --overwrite")
        log.info("fold %d: %s exists, skipped", fold, done)
        return results
    start = now()
    device = torch.device(device) if device is not None else resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    model = model_factory(cfg.model.name, dataset.feature_dim, task.n_outputs, **cfg.model.kwargs)
    trainer = Trainer(model, task, SplitView(dataset, split.train), SplitView(dataset, split.val),
                      SplitView(dataset, split.test), cfg=cfg.train, out_dir=fold_dir,
                      selection=cfg.resolved_selection(), device=device, callbacks=callbacks,
                      run_config=fold_config, record=record)
    results = trainer.fit(resume=True)
    _write_card(fold_dir, cfg, dataset, task, fold)
    write_manifest(fold_dir, config=cfg.to_dict(), device=device,
                   seeds={"train": cfg.train.seed, "splits": cfg.data.seed}, scan_backend=results.get("scan_backend"),
                   label_files=label_files, split_files=split_files, feature_files=feature_files, start=start,
                   extra={"fold": fold, "selection": results["selection"],
                          "reported_epoch": results["reported_epoch"], "fingerprint": trainer.fingerprint,
                          "run_config": fold_config, **(record or {})})
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
    while True:
        job = jobs.get()
        if job is None:
            return
        fold, kw = job
        try:
            res = run_fold(cfg, fold, splits[fold], dataset, task, out_dir=out_dir, device=f"cuda:{gpu}",
                           model_factory=model_factory, **files, **kw)
            results.put((fold, res, None))
        except Exception:  # noqa: BLE001 - reported to the parent, the other folds go on
            results.put((fold, None, traceback.format_exc()))


def check_model(cfg: Config, in_dim: int, n_outputs: int, model_factory=None) -> None:
    """Build the model once (CPU) so that arguments it refuses fail before any training.
    Raises ConfigError naming the model and its arguments."""
    if model_factory is None:
        from .models import build_model as model_factory
    try:
        model = model_factory(cfg.model.name, in_dim, n_outputs, **cfg.model.kwargs)
    except Exception as e:  # noqa: BLE001 - whatever the constructor raises, it is the config's fault
        args = ", ".join(f"{k}={v!r}" for k, v in cfg.model.kwargs.items()) or "no arguments"
        raise ConfigError(f"model: {cfg.model.name} cannot be built with {args} "
                          f"(in_dim {in_dim}, n_outputs {n_outputs}): {type(e).__name__}: {e}") from None
    del model


def _check_fold_parts(cfg: Config, splits, folds, dataset) -> None:
    """Every fold to run has training bags, and validation bags when the selection rule needs them.
    Raises ValueError listing the folds that do not (before any fold trains)."""
    have = set(getattr(dataset, "ids", []))
    selection = cfg.resolved_selection()
    problems = []
    for f in folds:
        n_train = sum(i in have for i in splits[f].train)
        n_val = sum(i in have for i in splits[f].val)
        if n_train == 0:
            problems.append(f"fold {f}: no training bag with features")
        elif selection != "last" and n_val == 0:
            problems.append(f"fold {f}: its validation part holds no bag with features")
    if problems:
        hint = (f"; train.selection {selection!r} picks the epoch on the validation part: raise data.val_fraction "
                f"(now {cfg.data.val_fraction}) or use train.selection: last"
                if any("validation" in p for p in problems) else "")
        raise ValueError("; ".join(problems) + hint)


def _say(echo: bool, msg: str) -> None:
    log.info(msg)
    if echo:
        print(f"[crossval] {msg}", flush=True)


def crossval(cfg: Config, *, dataset=None, table=None, splits=None, task: Optional[Task] = None,
             folds: Optional[Sequence[int]] = None, devices: Optional[Sequence[int]] = None,
             split_files: Sequence = (), label_files: Sequence = (), callbacks: Sequence = (),
             model_factory=None, overwrite: bool = False, echo: bool = True) -> CrossvalResult:
    """Run the folds of ``cfg`` and aggregate the table.

    Args:
        cfg: the validated config.
        dataset, table: already-built data (default: from ``cfg.data``, every file validated).
        splits: list of splits with ``train``/``val``/``test`` id lists (default: :func:`load_splits`).
        task: default :func:`task_for`.
        folds: which folds to run (default all); the table holds every finished fold on disk.
        devices: CUDA device indices for parallel folds (default: every visible GPU when
            ``train.device`` is auto/cuda and more than one exists; otherwise sequential).
        model_factory: see :func:`run_fold` (must be picklable for parallel folds).
        overwrite: folds on disk made with another configuration start afresh (those not run now are
            removed) instead of refusing the run.
        echo: print what happens to each fold (skipped, resumed from which epoch, started).
    Raises:
        ConfigError / ValueError for a device that is not there, a model that cannot be built, unusable
        feature files, bad splits; :class:`~ssm2d_path.runstate.RunConflictError` when the output
        folder holds folds of another configuration (without ``overwrite``). All before any training.
    """
    out = Path(cfg.output.dir)
    start = now()
    device = check_device(cfg.train.device)
    if devices:
        n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
        wrong = [g for g in devices if not 0 <= int(g) < n_gpu]
        if wrong:
            raise ValueError(f"--gpus: device(s) {wrong} do not exist ({n_gpu} CUDA device(s) visible)")
    if dataset is None:
        table, dataset = build_dataset(cfg)
        label_files = [cfg.data.label_csv]
    pending = None
    if splits is None:
        splits, split_files, pending = _resolve_splits(cfg, table, out, ids=list(dataset.ids))
    if task is None:
        task = task_for(cfg, table, dataset)
    folds = list(range(len(splits))) if folds is None else list(folds)
    for f in folds:
        if not 0 <= f < len(splits):
            raise ValueError(f"fold {f} does not exist ({len(splits)} splits: 0..{len(splits) - 1})")
    check_model(cfg, int(dataset.feature_dim), int(task.n_outputs), model_factory)
    _check_fold_parts(cfg, splits, folds, dataset)
    skipped = [{"slide": s, "reason": r} for s, r in getattr(dataset, "skipped", [])]
    base = run_config(cfg, feature_dim=getattr(dataset, "feature_dim", None), label_files=label_files)
    ids = list(getattr(dataset, "ids", []))
    expected = {i: fold_run_config(base, i, s, ids) for i, s in enumerate(splits)}
    plan = plan_folds(out, expected, folds, overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    if pending is not None:
        split_files = _write_pending(cfg, splits, pending)
    unusable = [s for s in skipped if s["reason"].startswith("unusable")]
    if unusable:
        _say(echo, f"{len(unusable)} slide(s) left out (data.skip_bad_files): "
                   + "; ".join(f"{s['slide']}: {s['reason'][len('unusable: '):]}" for s in unusable[:10])
                   + (" ..." if len(unusable) > 10 else ""))
    for line in plan.lines():
        _say(echo, line)
    files = {"feature_files": _feature_files(dataset), "label_files": list(label_files),
             "split_files": list(split_files)}
    record = {"skipped_slides": skipped}
    to_run = [f for f in folds if plan.actions[f] != "skip"]
    if devices is None and cfg.train.device in ("auto", "cuda") and torch.cuda.is_available() \
            and torch.cuda.device_count() > 1:
        devices = list(range(torch.cuda.device_count()))
    result = CrossvalResult(out_dir=out, plan=plan, skipped_slides=skipped)
    parallel = bool(devices) and len(devices) > 1 and len(to_run) > 1
    if parallel:
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        jobs, results = ctx.Queue(), ctx.Queue()
        for f in to_run:
            jobs.put((f, {"fold_config": expected[f], "record": record}))
        workers = min(len(devices), len(to_run))
        for _ in range(workers):
            jobs.put(None)
        procs = [ctx.Process(target=_gpu_worker, args=(devices[i], cfg, dataset, task, splits, out, files,
                                                       model_factory, jobs, results), daemon=False)
                 for i in range(workers)]
        for p in procs:
            p.start()
        for _ in to_run:
            fold, res, tb = results.get()
            if tb is not None:
                result.failures[fold] = tb
        for p in procs:
            p.join()
    else:
        for f in to_run:
            try:
                run_fold(cfg, f, splits[f], dataset, task, out_dir=out, device=device, callbacks=callbacks,
                         model_factory=model_factory, fold_config=expected[f], record=record, **files)
            except Exception:  # noqa: BLE001 - reported, the other folds go on
                result.failures[f] = traceback.format_exc()
    for f, tb in sorted(result.failures.items()):
        fold_dir = out / f"fold_{f}"
        fold_dir.mkdir(parents=True, exist_ok=True)
        with atomic_output(fold_dir / "error.txt") as tmp:
            tmp.write_text(tb)
        log.error("fold %d failed:\n%s", f, tb)
    for f in folds:
        if f not in result.failures:
            stale = out / f"fold_{f}" / "error.txt"
            if stale.is_file():
                stale.unlink()
    done = finished_folds(out, expected)
    result.rows = [fold_row(f, done[f]) for f in sorted(done)]
    _write_table(out, result)
    write_manifest(out, config=cfg.to_dict(),
                   device=torch.device("cuda", devices[0]) if parallel else device,
                   seeds={"train": cfg.train.seed, "splits": cfg.data.seed},
                   scan_backend=next((done[f].get("scan_backend") for f in sorted(done)), None),
                   start=start, extra={"fingerprint": fingerprint(base), "run_config": base,
                                       "folds": sorted(done), "run_folds": folds,
                                       "fold_actions": {str(f): a for f, a in sorted(plan.actions.items())},
                                       "removed_folds": plan.removed, "overwrite": bool(overwrite),
                                       "failed_folds": sorted(result.failures), "skipped_slides": skipped,
                                       "gpus": list(devices) if parallel else None}, **files)
    return result


def _write_table(out: Path, result: CrossvalResult) -> None:
    """results.csv / results.md / results_folds.csv from ``result.rows``; none left when there is no row."""
    from .metrics import write_results_table

    if result.rows:
        _, _, result.markdown = write_results_table(result.rows, out)
        return
    for name in ("results.csv", "results.md", "results_folds.csv"):
        if (out / name).is_file():
            (out / name).unlink()
