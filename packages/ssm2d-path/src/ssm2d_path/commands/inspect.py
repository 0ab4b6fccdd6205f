"""``ssm2d-path inspect PATH...``: what is in feature files, slide by slide, and the grid each one makes."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from .._progress import progress_bar

from ..io import EmptySlideError, SlideFileError, detect_format, read_slide
from ..io.readers import H5_SUFFIXES, PT_SUFFIXES, is_patches_file

__all__ = ["register", "run", "inspect_file", "collect_files"]


def collect_files(paths: list[str]) -> tuple[list[Path], list[Path]]:
    """(feature files, CLAM patches files skipped) from files and folders (searched recursively)."""
    files, patches = [], []
    for p in map(Path, paths):
        if p.is_dir():
            cands = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in H5_SUFFIXES + PT_SUFFIXES
                           and not f.name.startswith("."))
            for f in cands:
                (patches if is_patches_file(f) else files).append(f)
        else:
            files.append(p)  # named explicitly: read it, and report it if it is not a feature file
    return files, patches


def _num(v: Any) -> Optional[float]:
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None


def inspect_file(path: Path, *, fmt: str = "auto", patches_dir: Optional[Path] = None,
                 stride: Optional[float] = None, mpp: Optional[float] = None) -> dict:
    """One row of the report: format, N, F, stride and its source, grid, fill, magnification, encoder."""
    row: dict[str, Any] = {"path": str(path), "slide": path.stem}
    patches = None
    if patches_dir is not None and (patches_dir / f"{path.stem}.h5").is_file():
        patches = patches_dir / f"{path.stem}.h5"
    try:
        row["format"] = detect_format(path) if fmt == "auto" else fmt
        g = read_slide(path, fmt=row["format"], patches_path=patches, stride=stride, mpp=mpp)
    except EmptySlideError as e:
        row.update(status="empty", n=0, error=str(e))
        return row
    except SlideFileError as e:
        row.update(status="failed", error=str(e))
        return row
    h, w = g.shape
    m = g.meta
    row.update(status="ok", n=g.num_patches, f=int(g.features.shape[1]), stride=g.stride,
               stride_source=m.get("stride_source"), grid=[h, w], fill=100.0 * g.num_patches / (h * w),
               magnification=_num(m.get("magnification")), level0_magnification=_num(m.get("level0_magnification")),
               mpp=_num(m.get("mpp")), encoder=m.get("encoder"), patch_size_level0=g.patch_size_level0,
               coords_unit=m.get("coords_unit", "level0_px"))
    if m.get("stride_note"):
        row["note"] = m["stride_note"]
    return row


def _fmt_opt(v: Optional[float], suffix: str = "") -> str:
    return "-" if v is None else f"{v:g}{suffix}"


def _print_table(rows: list[dict], out) -> None:
    head = ["slide", "format", "N", "F", "stride", "source", "grid", "fill", "mag", "mpp", "encoder"]
    lines = [head]
    for r in rows:
        if r["status"] == "ok":
            lines.append([r["slide"], r["format"], str(r["n"]), str(r["f"]), str(r["stride"]), r["stride_source"],
                          f"{r['grid'][0]}x{r['grid'][1]}", f"{r['fill']:.1f}%", _fmt_opt(r["magnification"], "x"),
                          _fmt_opt(r["mpp"]), str(r["encoder"] or "-")])
        else:
            lines.append([r["slide"], r.get("format", "?"), str(r.get("n", "-")), "-", "-", "-", "-", "-", "-", "-",
                          r["status"].upper()])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for line in lines:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip(), file=out)
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['status']}: {r['error']}", file=out)
        elif r.get("note"):
            print(f"note: {r['slide']}: {r['note']}", file=out)


def summarize(rows: list[dict], n_patches_files: int = 0) -> dict:
    ok = [r for r in rows if r["status"] == "ok"]
    return {"files": len(rows), "ok": len(ok), "empty": sum(r["status"] == "empty" for r in rows),
            "failed": sum(r["status"] == "failed" for r in rows), "patches": sum(r["n"] for r in ok),
            "strides": dict(sorted(Counter(r["stride"] for r in ok).items())),
            "feature_dims": sorted({r["f"] for r in ok}), "patches_files_skipped": n_patches_files}


def run(args: argparse.Namespace) -> int:
    files, patches_files = collect_files(args.paths)
    if not files:
        print(f"inspect: no feature files (.h5, .hdf5, .pt, .pth) in {' '.join(args.paths)}", file=sys.stderr)
        return 1
    pdir = Path(args.patches_dir) if args.patches_dir else None
    rows = [inspect_file(f, fmt=args.format, patches_dir=pdir, stride=args.stride, mpp=args.mpp)
            for f in progress_bar(files, desc="inspect", unit="file", enabled=len(files) >= 2)]
    summary = summarize(rows, len(patches_files))
    if args.json:
        json.dump({"slides": rows, "summary": summary}, sys.stdout, indent=2, default=str)
        print()
    else:
        _print_table(rows, sys.stdout)
        strides = ", ".join(f"{k} px: {v}" for k, v in summary["strides"].items()) or "-"
        print(f"{summary['files']} file(s): {summary['ok']} ok, {summary['empty']} empty, {summary['failed']} failed; "
              f"{summary['patches']} patches; strides {strides}; feature dim {summary['feature_dims'] or '-'}"
              + (f"; {len(patches_files)} CLAM patches file(s) skipped" if patches_files else ""))
    return 1 if summary["failed"] else 0


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "inspect", help="show what feature files hold: format, patches, stride, grid",
        description="Per slide: format, number of patches N, feature dim F, level-0 stride and where it came "
                    "from, grid shape, fill %%, magnification/mpp, encoder; then a summary line. "
                    "Exit code 1 if a file cannot be read.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="feature files or folders (searched recursively)")
    p.add_argument("--format", choices=["auto", "clam", "trident", "stamp"], default="auto")
    p.add_argument("--patches-dir", help="CLAM patches folder (geometry; needed for .pt files)")
    p.add_argument("--stride", type=float, help="stride to use where the files' attributes give none")
    p.add_argument("--mpp", type=float, help="level-0 micrometres per pixel (STAMP)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)
    return p
