"""The ``ssm2d-path`` command: one entry point whose subcommands mirror the pipeline stages."""

from __future__ import annotations

import argparse
import importlib.metadata as md
import sys

from .__about__ import __version__
from .commands import convert as _convert, inspect as _inspect


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
