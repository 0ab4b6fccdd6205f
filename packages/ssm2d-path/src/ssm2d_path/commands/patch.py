"""``ssm2d-path patch``: tissue detection and patch grids of slides, in TRIDENT's layout.

    ssm2d-path patch [--config C] [--slides PATH ...] [--job-dir DIR] [--mpp X] [--set patch.key=value] [--overwrite]

Values on the command line override the config (``slides.dir``, ``slides.job_dir``, ``slides.mpp``).
Writes ``<job_dir>/<mag>x_<px>px_<ov>px_overlap/patches/<slide>_patches.h5`` and
``.../visualization/<slide>.png``; exit code 1 when a slide failed (the others are still done).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

__all__ = ["register", "run"]


def _config(args: argparse.Namespace):
    from ..config import apply_overrides, load_config, parse_config

    if args.config:
        return load_config(args.config, args.set or [], check_model=False)
    return parse_config(apply_overrides({}, args.set or []), check_model=False)


def _slide_paths(args: argparse.Namespace, slides_cfg) -> list[Path]:
    from ..wsi.patching import find_slides

    if not args.slides:
        return find_slides(slides_cfg)
    paths: list[Path] = []
    for item in args.slides:
        paths.extend(find_slides(replace(slides_cfg, dir=item)))
    return paths


def _summary(report, job_dir: Path, folder: str) -> None:
    for path in report.written:
        n = report.num_patches.get(Path(path).stem, 0)
        print(f"  {Path(path).name}: {n} patches" + (" (no tissue: empty file)" if n == 0 else ""))
    for path in report.skipped:
        n = report.num_patches.get(Path(path).stem)
        print(f"  {Path(path).name}: already done ({'?' if n is None else n} patches; --overwrite to redo)")
    for path, reason in report.failed.items():
        print(f"FAILED: {reason}", file=sys.stderr)
    print(f"patched {len(report.written)} slide(s), {len(report.skipped)} already done, {len(report.failed)} failed; "
          f"output in {job_dir / folder}")


def run(args: argparse.Namespace) -> int:
    from ..config import ConfigError
    from ..wsi.coords import grid_folder
    from ..wsi.patching import patch_slides, target_resolution

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = _config(args)
        if args.mpp is not None and not args.mpp > 0:
            raise ValueError(f"--mpp: must be > 0 micrometres per pixel, got {args.mpp}")
        paths = _slide_paths(args, cfg.slides)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"ssm2d-path patch: error: {e}", file=sys.stderr)
        return 2
    if not paths:
        where = ", ".join(args.slides) if args.slides else cfg.slides.dir
        print(f"ssm2d-path patch: error: no slide files ({', '.join(cfg.slides.extensions)}) in {where}",
              file=sys.stderr)
        return 2
    job_dir = Path(args.job_dir or cfg.slides.job_dir)
    mpp = args.mpp if args.mpp is not None else cfg.slides.mpp
    report = patch_slides(paths, job_dir, cfg.patch, mpp=mpp, overwrite=args.overwrite,
                          progress=not args.no_progress)
    folder = grid_folder(target_resolution(cfg.patch)[0], cfg.patch.patch_size, cfg.patch.overlap)
    _summary(report, job_dir, folder)
    return 1 if report.failed else 0


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "patch", help="detect tissue and write patch grids of slides (TRIDENT patches files)",
        description="Per slide: tissue mask on a low-resolution picture, a patch grid at the target magnification "
                    "or mpp (level-0 stride per slide), <job_dir>/<mag>x_<px>px_<ov>px_overlap/patches/"
                    "<slide>_patches.h5 and visualization/<slide>.png. Slides already done are skipped; "
                    "unreadable slides are reported (exit code 1) and the others are still done.")
    p.add_argument("--config", default=None, help="YAML config with slides: and patch: sections (optional)")
    p.add_argument("--slides", nargs="+", metavar="PATH", help="slide files or folders (default: slides.dir)")
    p.add_argument("--job-dir", default=None, help="output folder (default: slides.job_dir)")
    p.add_argument("--mpp", type=float, default=None,
                   help="level-0 micrometres per pixel for slides that record none (default: slides.mpp)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set patch.target_magnification=10")
    p.add_argument("--overwrite", action="store_true", help="redo slides whose patches file exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p
