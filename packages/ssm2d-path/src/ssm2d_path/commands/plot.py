"""``ssm2d-path plot --run RUN_DIR``: Kaplan-Meier (survival) or ROC (classification) figures of a run."""

from __future__ import annotations

import argparse
import sys

__all__ = ["register", "run"]


def run(args: argparse.Namespace) -> int:
    from ..plots import plot_run

    try:
        paths = plot_run(args.run, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"ssm2d-path plot: error: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(f"wrote {p}")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "plot", help="Kaplan-Meier curves of the risk groups or ROC curves of a cross-validation run",
        description="Pool fold_*/predictions_test.csv of a run: survival -> km_risk_groups.png (each fold split "
                    "at its own median risk, log-rank p, numbers at risk); classification -> roc.png (one-vs-rest "
                    "per class, AUC, per-fold mean +- std). A folder of runs (e.g. a demo cohort) gets one figure "
                    "per run.")
    p.add_argument("--run", required=True, help="run folder with fold_*/predictions_test.csv (or a folder of runs)")
    p.add_argument("--out", default=None, help="output folder (default: the run folder)")
    p.set_defaults(func=run)
    return p
