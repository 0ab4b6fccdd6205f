"""``ssm2d-path extract``: patch features of every patched slide of a job folder (TRIDENT layout).

Several GPUs: ``torchrun --nproc-per-node K -m ssm2d_path.cli extract ...`` shards the slides across
the K processes (one GPU each).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

__all__ = ["find_patch_files", "register", "run"]


def find_patch_files(job_dir=None, patches_dir=None) -> list[Path]:
    """Every ``*_patches.h5`` in ``patches_dir``, else in ``<job_dir>/*/patches/``, sorted."""
    from ..wsi.coords import PATCHES_SUFFIX

    if patches_dir is not None:
        root = Path(patches_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"--patches-dir {root}: no such folder")
        return sorted(root.glob(f"*{PATCHES_SUFFIX}"))
    root = Path(job_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"job_dir {root}: no such folder (run `ssm2d-path patch` first)")
    return sorted(root.glob(f"*/patches/*{PATCHES_SUFFIX}"))


def _configs(args: argparse.Namespace):
    from ..config import apply_overrides, load_config, parse_config

    if args.config:
        cfg = load_config(args.config, args.set or [], check_model=False)
    else:
        cfg = parse_config(apply_overrides({}, args.set or []), check_model=False)
    ex = {k: v for k, v in {"encoder": args.encoder, "weights": args.weights, "name": args.name,
                            "batch_size": args.batch_size, "num_workers": args.num_workers,
                            "device": args.device, "precision": args.precision}.items() if v is not None}
    if args.overwrite:
        ex["overwrite"] = True
    extract = dataclasses.replace(cfg.extract, **ex)
    extract.check()
    slides = cfg.slides
    job_dir = args.job_dir or slides.job_dir
    slides_dir = args.slides or slides.dir
    mpp = args.mpp if args.mpp is not None else slides.mpp
    return extract, job_dir, slides_dir, mpp


def run(args: argparse.Namespace) -> int:
    from ..config import ConfigError
    from ..wsi.extract import extract_slides

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg, job_dir, slides_dir, mpp = _configs(args)
        files = find_patch_files(job_dir, args.patches_dir)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"ssm2d-path extract: error: {e}", file=sys.stderr)
        return 2
    if not files:
        where = args.patches_dir or f"{job_dir}/*/patches/"
        print(f"ssm2d-path extract: error: no *_patches.h5 files in {where}", file=sys.stderr)
        return 2
    try:
        rep = extract_slides(files, job_dir, cfg, slides_dir=slides_dir, mpp=mpp, progress=not args.no_progress)
    except ValueError as e:  # the encoder or weights cannot be built: every slide would fail alike
        print(f"ssm2d-path extract: error: {e}", file=sys.stderr)
        return 2
    for pf, reason in sorted(rep.failed.items()):
        print(f"FAILED {reason}", file=sys.stderr)
    if rep.rank == 0:
        ranks = f" on {rep.world_size} ranks" if rep.world_size > 1 else ""
        print(f"extract: {rep.n_written} written, {rep.n_skipped} already there, {rep.n_failed} failed{ranks}; "
              f"{rep.patches} patches in {rep.seconds:.1f} s = {rep.patches_per_s:.1f} patches/s "
              f"({rep.device}, {rep.precision}); features in {job_dir}/*/features_{cfg.name or cfg.encoder}/")
    return 1 if rep.n_failed else 0


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "extract", help="patch features of every patched slide (any timm encoder) in TRIDENT's layout",
        description="For every <job_dir>/<grid>/patches/<slide>_patches.h5 write "
                    "<job_dir>/<grid>/features_<encoder>/<slide>.h5. Slides whose features file already holds "
                    "the patches file's coordinates are skipped (--overwrite redoes them). Under "
                    "`torchrun --nproc-per-node K -m ssm2d_path.cli extract ...` the slides are sharded across "
                    "the K processes. Exit code 1 when a slide failed.")
    p.add_argument("--config", help="YAML config (sections slides and extract)")
    p.add_argument("--job-dir", help="the job folder (default: slides.job_dir)")
    p.add_argument("--patches-dir", help="one folder of *_patches.h5 files (default: every <job_dir>/*/patches/)")
    p.add_argument("--slides", help="folder of the slides, for patches files whose recorded slide path is gone "
                                    "(default: slides.dir)")
    p.add_argument("--encoder", help="timm model name (default: extract.encoder)")
    p.add_argument("--weights", help="local weights file (.safetensors, .pth, .pt, .bin); default: random init")
    p.add_argument("--name", help="encoder name in features_<name> (default: the encoder)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--num-workers", type=int, help="patch-reading worker processes per rank")
    p.add_argument("--device", help="auto (GPU when there is one), cpu, cuda, cuda:<i>")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--mpp", type=float, help="level-0 micrometres per pixel for slides that record none")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set extract.encoder_kwargs={img_size: 224}")
    p.add_argument("--overwrite", action="store_true", help="extract again even where features exist")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p
