"""``ssm2d-path convert SRC_DIR DST_DIR --from clam|stamp``: feature files to TRIDENT's layout."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .._progress import progress_bar

from ..data.dataset import index_feature_files
from ..io import EmptySlideError, SlideFileError, convert_slide

__all__ = ["register", "run"]


def run(args: argparse.Namespace) -> int:
    src = Path(args.src_dir)
    try:
        files = index_feature_files(src)
    except FileNotFoundError as e:
        print(f"convert: {e}", file=sys.stderr)
        return 2
    if not files:
        print(f"convert: no feature files in {src}", file=sys.stderr)
        return 2
    if args.source == "clam" and not args.level0_magnification:
        print("convert: --level0-magnification is required with --from clam (CLAM files do not record it)",
              file=sys.stderr)
        return 2
    pdir = Path(args.patches_dir) if args.patches_dir else None
    written, existing, empty, failed = [], [], [], []
    for slide, path in progress_bar(sorted(files.items()), desc="convert", unit="slide"):
        patches = pdir / f"{slide}.h5" if pdir is not None and (pdir / f"{slide}.h5").is_file() else None
        try:
            dst, done = convert_slide(path, args.dst_dir, fmt=args.source, patches_path=patches, stride=args.stride,
                                      encoder=args.encoder, level0_magnification=args.level0_magnification,
                                      mpp=args.mpp, overwrite=args.overwrite)
        except EmptySlideError as e:
            empty.append(str(e))
            continue
        except (SlideFileError, ValueError) as e:
            failed.append(f"{path}: {e}" if str(path) not in str(e) else str(e))
            continue
        (written if done else existing).append(dst)
    for msg in empty:
        print(f"skipped (empty): {msg}", file=sys.stderr)
    for msg in failed:
        print(f"FAILED: {msg}", file=sys.stderr)
    folders = sorted({str(p.parent) for p in written + existing})
    print(f"converted {len(written)} slide(s), {len(existing)} already there, {len(empty)} empty skipped, "
          f"{len(failed)} failed; output in {', '.join(folders) or args.dst_dir}")
    return 1 if failed else 0


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "convert", help="convert CLAM or STAMP feature files to TRIDENT's layout",
        description="Write DST_DIR/<mag>x_<px>px_<ov>px_overlap/features_<encoder>/<slide>.h5 per slide, keeping "
                    "the source's attributes (source_*). Bad files are reported and skipped (exit code 1); "
                    "empty slides are skipped.")
    p.add_argument("src_dir", metavar="SRC_DIR", help="CLAM feature folder (h5_files/, pt_files/) or STAMP folder")
    p.add_argument("dst_dir", metavar="DST_DIR")
    p.add_argument("--from", dest="source", choices=["clam", "stamp"], required=True)
    p.add_argument("--patches-dir", help="CLAM patches folder (patch size and downsample; needed for .pt files)")
    p.add_argument("--stride", type=float, help="level-0 stride where the files' attributes give none")
    p.add_argument("--encoder", help="encoder name for the folder and attribute (default: STAMP's extractor; "
                                     "'unknown' for CLAM)")
    p.add_argument("--level0-magnification", type=float, help="level-0 magnification (required for CLAM)")
    p.add_argument("--mpp", type=float, help="level-0 micrometres per pixel (STAMP: coordinates to level-0 px)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(func=run)
    return p
