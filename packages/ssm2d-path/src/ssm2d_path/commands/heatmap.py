"""``ssm2d-path heatmap --checkpoint MODEL.pt``: per-patch scores of a trained model over the slides."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

__all__ = ["find_feature_dir", "register", "run"]


def find_feature_dir(job_dir: Path, encoder: Optional[str]) -> Path:
    """The ``<grid>/features_<encoder>`` folder of a job: the card's encoder when known, else the only one.
    Raises FileNotFoundError listing what is there."""
    found = sorted(d for d in Path(job_dir).glob("*/features_*") if d.is_dir())
    if encoder:
        mine = [d for d in found if d.name == f"features_{encoder}"]
        if len(mine) == 1:
            return mine[0]
        if len(mine) > 1:
            raise FileNotFoundError(f"job dir {job_dir}: several features_{encoder} folders ({', '.join(map(str, mine))}); "
                                    f"choose one with --features")
    if len(found) == 1:
        return found[0]
    if not found:
        raise FileNotFoundError(f"job dir {job_dir}: no <grid>/features_<encoder> folder; give --features")
    raise FileNotFoundError(f"job dir {job_dir}: several feature folders ({', '.join(map(str, found))}); "
                            f"give --features")


def _config(args: argparse.Namespace):
    from ..config import apply_overrides, load_config, parse_config

    if args.config:
        return load_config(args.config, args.set or [], check_model=False)
    return parse_config(apply_overrides({}, args.set or []), check_model=False)


def run(args: argparse.Namespace) -> int:
    from ..config import ConfigError
    from ..models.saved import ModelCardError, load_trained_model
    from ..train import resolve_device
    from ..wsi.heatmap import feature_files_in, heatmap_slides

    try:
        cfg = _config(args)
    except ConfigError as e:
        print(f"ssm2d-path heatmap: error: {e}", file=sys.stderr)
        return 2
    hm = cfg.heatmap
    if args.method:
        hm.method = args.method
    checkpoint = args.checkpoint or hm.checkpoint
    if not checkpoint:
        print("ssm2d-path heatmap: error: give --checkpoint (or heatmap.checkpoint in the config)", file=sys.stderr)
        return 2
    try:
        model, card = load_trained_model(checkpoint, device=resolve_device(hm.device))
        job_dir = Path(args.job_dir or cfg.slides.job_dir)
        if args.features:
            files = feature_files_in(args.features)
            first = Path(files[0]).parent
            default_job = first.parent.parent if first.name.startswith("features_") else None
            if args.job_dir is None and default_job is not None:
                job_dir = default_job
        else:
            files = feature_files_in(find_feature_dir(job_dir, card.get("encoder")))
    except (ModelCardError, FileNotFoundError, ValueError) as e:
        print(f"ssm2d-path heatmap: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else job_dir / "heatmaps"
    slides_dir = args.slides or cfg.slides.dir
    print(f"heatmaps of {len(files)} slide(s) with {card['name']} ({checkpoint}) -> {out}", flush=True)
    report = heatmap_slides(files, model, card, out, hm, slides_dir=slides_dir, mpp=cfg.slides.mpp,
                            progress=not args.no_progress)
    for slide, paths in sorted(report.written.items()):
        print(f"{slide}: " + ", ".join(str(p) for p in paths if p.parent.name != "top_k")
              + (f" (+ {sum(p.parent.name == 'top_k' for p in paths)} top-k patches)" if paths else ""))
    for f, reason in sorted(report.skipped.items()):
        print(f"skipped (empty): {reason}", file=sys.stderr)
    for f, reason in sorted(report.failed.items()):
        print(f"FAILED {f}: {reason}", file=sys.stderr)
    print(f"{len(report.written)} slide(s) written to {out}, {len(report.skipped)} empty skipped, "
          f"{len(report.failed)} failed")
    return 1 if report.failed else 0


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "heatmap", help="per-patch scores of a trained model drawn over the slides (PNG, CSV, HDF5, top-k patches)",
        description="For every features file: the model's attention scores (and, for 2D-scan models or "
                    "--method gradient/both, gradient x input contributions), rank-percentile normalised and "
                    "drawn over the slide thumbnail, written to <out>/<slide>/heatmap_<method>.png with "
                    "scores.csv, scores.h5, top_k/ and heatmap.json. The model is rebuilt from model.json "
                    "next to the checkpoint.")
    p.add_argument("--checkpoint", default=None, help="model.pt of a run (model.json next to it)")
    p.add_argument("--config", default=None, help="YAML config (its slides and heatmap sections are used)")
    p.add_argument("--features", default=None,
                   help="a features file or folder (default: <job_dir>/<grid>/features_<encoder of the model>)")
    p.add_argument("--job-dir", default=None, help="the job folder (default: slides.job_dir of the config)")
    p.add_argument("--slides", default=None, help="folder of the slides, for features files whose slide_path "
                                                   "does not exist here (default: slides.dir)")
    p.add_argument("--out", default=None, help="output folder (default: <job_dir>/heatmaps)")
    p.add_argument("--method", choices=["auto", "attention", "gradient", "both"], default=None,
                   help="scores to draw (default heatmap.method: auto = attention, plus gradient for 2D-scan models)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set heatmap.top_k=16")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p
