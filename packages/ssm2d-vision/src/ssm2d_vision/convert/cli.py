"""``python -m ssm2d_vision.convert --model NAME SRC DST``: a released checkpoint -> our state dict."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import torch
from ssm2d_nn.fileio import atomic_output


def _atomic_save(obj, dst: str) -> None:
    with atomic_output(dst) as tmp:
        torch.save(obj, tmp)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from . import CONVERTERS, converter_for

    parser = argparse.ArgumentParser(prog="ssm2d-vision-convert",
                                     description="Convert a released checkpoint to an ssm2d-vision state dict.")
    parser.add_argument("--model", required=True, help=f"our model name (families: {', '.join(sorted(CONVERTERS))})")
    parser.add_argument("--no-strict", action="store_true",
                        help="warn about missing/unexpected keys instead of failing")
    parser.add_argument("--overwrite", action="store_true", help="replace DST when it exists")
    parser.add_argument("src", help="released checkpoint (.pth)")
    parser.add_argument("dst", help="output file (our state dict, torch.save)")
    args = parser.parse_args(argv)
    import ssm2d_vision  # noqa: F401  (registers the models; needed to check the converted keys)

    def fail(msg: str) -> int:
        print(f"ssm2d-vision-convert: error: {' '.join(str(msg).split())}", file=sys.stderr)
        return 1

    if not os.path.isfile(args.src):
        return fail(f"SRC {args.src!r} is not a file")
    if os.path.isdir(args.dst):
        return fail(f"DST {args.dst!r} is a folder; give the output file's path")
    if os.path.exists(args.dst):
        if os.path.samefile(args.src, args.dst):
            return fail(f"DST {args.dst!r} is SRC; write the converted weights to another file")
        if not args.overwrite:
            return fail(f"DST {args.dst!r} exists; pass --overwrite to replace it")
    try:
        conv = converter_for(args.model)
        sd = conv.load_released(args.src, args.model, strict=not args.no_strict)
    except (ValueError, RuntimeError, TypeError, KeyError, OSError) as exc:
        return fail(exc)
    try:
        _atomic_save(sd, args.dst)
    except OSError as exc:
        return fail(f"DST {args.dst!r} cannot be written: {exc}")
    print(f"wrote {len(sd)} tensors for {args.model} to {args.dst}")
    return 0
