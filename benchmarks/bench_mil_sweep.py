"""Cross-validate MIL models through the ``ssm2d-path`` command on synthetic cohorts of graded difficulty.

For every level (a :class:`mil_cohorts.CohortSpec`) the cohort is written as TRIDENT files, the
patient-level splits once (``ssm2d-path splits``), and each model is cross-validated with
``ssm2d-path crossval --config <level>/<model>.yaml`` (one process, ``OMP_NUM_THREADS`` threads). Next to
the models, the oracle (:func:`mil_cohorts.oracle_scores`: given the two motif directions, the best
adjacent A-B pairs) is scored on each fold's test slides. For the 2D models the attention on the motif
cells of the test slides is measured (:func:`attention_on_motifs`).

Output (``--out``, default ``benchmarks/results/<date>-cpu-mil-sweep-<commit>/``): ``table.md`` (mean ±
std test AUC over folds per model and level, the oracle, the recipe), ``results.json`` (every fold's
metrics and epoch history), ``curves_<level>.png`` (training and validation loss per epoch, mean over
folds, per model), ``attention.md`` and ``sweep.json`` (what was run). The cohorts and runs themselves
go to ``--work`` (default: ``<out>/work``; not meant to be committed).

    python benchmarks/bench_mil_sweep.py --levels easy target --models 2dmambamil abmil
    python benchmarks/bench_mil_sweep.py --recipe paper --set train.epochs=12
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mil_cohorts import GRID_FOLDER, ENCODER, CohortSpec, generate, oracle_scores  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("2dmambamil", "m2dmil", "mambamil", "abmil", "transmil")
# Difficulty levels: the cohort is "target"; "easy" is close to the demo's classification cohort
# (16-d, noise 0.3) on bigger, unpaired slides; "medium" has the target's 64-d features at half its noise
# with every pair touching.
LEVELS = {
    "easy": CohortSpec(slides=120, motifs=5, adjacent=5, noise=0.3, dim=16, patches=(300, 1200)),
    "medium": CohortSpec(slides=120, motifs=5, adjacent=5, noise=0.5, dim=64, patches=(300, 1200)),
    "target": CohortSpec(slides=120, motifs=5, adjacent=3, noise=1.0, dim=64, patches=(300, 2500)),
}
# Model sizes of the sweep: the demo's small models (the cohorts have 120 slides); with
# --model-sizes published, each model's constructor defaults (2DMambaMIL: dim 128, as in the paper).
MODEL_KWARGS = {
    "2dmambamil": {"dim": 32, "d_inner": 64, "d_state": 8, "attn_dim": 32},
    "m2dmil": {"dim": 32, "d_inner": 64, "d_state": 8, "attn_dim": 32},
    "mambamil": {"dim": 32, "d_inner": 64, "d_state": 8, "attn_dim": 32},
    "abmil": {"dim": 32, "attn_dim": 32},
    "transmil": {"dim": 32, "heads": 4},
}
SSM_2D = ("2dmambamil", "m2dmil")


def level_spec(name: str, slides: Optional[int] = None, seed: int = 0) -> CohortSpec:
    """The :class:`CohortSpec` of level ``name``, with ``slides`` and ``seed`` replaced when given."""
    if name not in LEVELS:
        raise ValueError(f"levels: unknown level {name!r}; expected some of {', '.join(LEVELS)}")
    spec = replace(LEVELS[name], seed=seed)
    return replace(spec, slides=slides) if slides else spec


def _cli(args: Sequence[str], log, threads: int) -> None:
    """Run ``python -m ssm2d_path.cli ARGS``; its output goes to ``log``; raises on a non-zero exit."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "ssm2d_path.cli", *args]
    log.write("$ " + " ".join(cmd) + "\n")
    log.flush()
    rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        raise RuntimeError(f"{' '.join(args[:1])} failed with exit code {rc} (see {log.name})")


def write_config(path: Path, cohort: Path, split_dir: Path, model: str, run_dir: Path, k: int,
                 recipe: Optional[str], seed: int, small: bool = True) -> Path:
    """The YAML config of one cross-validation (atomically)."""
    import yaml

    from ssm2d_nn.fileio import atomic_output

    train = {"device": "cpu", "progress": False, "seed": seed}
    if recipe:
        train["recipe"] = recipe
    cfg = {"data": {"feature_dir": str(cohort / GRID_FOLDER / f"features_{ENCODER}"),
                    "label_csv": str(cohort / "labels.csv"), "task": "classification", "level": "patient",
                    "split_dir": str(split_dir), "k": k, "seed": seed},
           "model": {"name": model, **(MODEL_KWARGS[model] if small else {})}, "train": train, "output": {"dir": str(run_dir)}}
    with atomic_output(path) as tmp:
        tmp.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def oracle_by_fold(cohort: Path, split_dir: Path, k: int, folds: Optional[Sequence[int]] = None) -> list[float]:
    """Test AUC of the oracle on each fold's test slides (the splits the models use; only ``folds``
    when given)."""
    from ssm2d_path.data import read_splits
    from ssm2d_path.metrics import binary_auc

    meta = json.loads((cohort / "cohort.json").read_text())
    spec = meta["spec"]
    scores = oracle_scores(cohort / GRID_FOLDER / f"features_{ENCODER}", np.asarray(meta["directions"]),
                           spec["noise"], k=max(1, spec["adjacent"]))
    labels = {s: v["label"] for s, v in meta["slides"].items()}
    out = []
    for f, split in enumerate(read_splits(split_dir, k=k)):
        if folds is not None and f not in folds:
            continue
        ids = [i for i in split.test if i in scores]
        out.append(binary_auc(np.array([labels[i] for i in ids]), np.array([scores[i] for i in ids])))
    return out


@__import__("torch").no_grad()
def attention_on_motifs(run_dir: Path, cohort: Path, split_dir: Path, k: int,
                        folds: Optional[Sequence[int]] = None) -> dict:
    """Where each fold's selected model puts its attention on its test slides.

    Returns mean over slides of: ``pair_mass_ratio`` (softmax attention on the cells of touching A-B
    pairs over their share of the slide's cells; 1 = no preference), ``motif_mass_ratio`` (the same
    for every A and B cell), ``pair_rank`` (mean rank percentile of the pair cells' attention logits,
    0.5 = random), for class-1 slides (pairs exist there) and, for motifs, all slides.
    """
    import torch

    from ssm2d_path.data import read_splits
    from ssm2d_path.io import read_slide
    from ssm2d_path.bag import Bag
    from ssm2d_path.models.saved import load_trained_model

    meta = json.loads((cohort / "cohort.json").read_text())
    froot = cohort / GRID_FOLDER / f"features_{ENCODER}"
    pair_ratio, motif_ratio, pair_rank = [], [], []
    for f, split in enumerate(read_splits(split_dir, k=k)):
        weights = run_dir / f"fold_{f}" / "model.pt"
        if not weights.is_file() or (folds is not None and f not in folds):
            continue
        model, _ = load_trained_model(weights, device="cpu")
        model.eval()
        for sid in split.test:
            truth = meta["slides"][sid]
            g = read_slide(froot / f"{sid}.h5")
            logits = model(Bag(sid, [g])).scores.double()
            att = torch.softmax(logits, 0).numpy()
            cell = {(int(r), int(c)): i for i, (r, c) in enumerate(zip(g.rows, g.cols))}
            a_cells = [cell[tuple(x)] for x in truth["A"]]
            b_cells = [cell[tuple(x)] for x in truth["B"]]
            motif = a_cells + b_cells
            motif_ratio.append(att[motif].sum() / (len(motif) / len(att)))
            pairs = _pair_cells(truth["A"], truth["B"], cell)
            if pairs:
                pair_ratio.append(att[pairs].sum() / (len(pairs) / len(att)))
                ranks = np.argsort(np.argsort(logits.numpy())) / max(len(att) - 1, 1)
                pair_rank.append(float(ranks[pairs].mean()))
    mean = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
    return {"pair_mass_ratio": mean(pair_ratio), "motif_mass_ratio": mean(motif_ratio), "pair_rank": mean(pair_rank),
            "slides_with_pairs": len(pair_ratio)}


def _pair_cells(a_cells, b_cells, cell: dict) -> list[int]:
    """Patch indices of the A and B cells that touch a cell of the other type (4-neighbours)."""
    bs = {tuple(b) for b in b_cells}
    out = set()
    for r, c in (tuple(a) for a in a_cells):
        for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            if (r + dr, c + dc) in bs:
                out.update((cell[(r, c)], cell[(r + dr, c + dc)]))
    return sorted(out)


def fold_results(run_dir: Path) -> list[dict]:
    """Every finished fold's results.json of a cross-validation run, in fold order."""
    out = []
    for p in sorted(run_dir.glob("fold_*/results.json"), key=lambda q: int(q.parent.name.split("_")[1])):
        r = json.loads(p.read_text())
        r["fold"] = int(p.parent.name.split("_")[1])
        out.append(r)
    return out


def loss_curves(folds: Sequence[dict]) -> dict:
    """Mean over folds of the training and validation loss per epoch: {"epoch", "train", "val"}, each a
    list as long as the longest run (epochs where only some folds still ran average those)."""
    n = max((len(f["history"]) for f in folds), default=0)
    train = [[f["history"][e]["train_loss"] for f in folds if e < len(f["history"])] for e in range(n)]
    val = [[f["history"][e].get("val_loss", float("nan")) for f in folds if e < len(f["history"])] for e in range(n)]
    return {"epoch": list(range(1, n + 1)), "train": [float(np.mean(v)) for v in train],
            "val": [float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for v in val]}


def plot_curves(curves: dict, path: Path, title: str) -> Path:
    """One panel per model: mean training (solid) and validation (dashed) loss per epoch."""
    from ssm2d_path.plots import _plt, _save

    plt = _plt()
    names = list(curves)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.8), squeeze=False, sharey=True)
    for ax, name in zip(axes[0], names):
        c = curves[name]
        ax.plot(c["epoch"], c["train"], "-", label="train")
        ax.plot(c["epoch"], c["val"], "--", label="validation")
        ax.axhline(np.log(2), color="grey", lw=0.5)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch")
    axes[0][0].set_ylabel("cross-entropy (mean over folds)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9, y=1.04)
    return _save(fig, path)


def _fmt(v: Sequence[float], k: Optional[int] = None) -> str:
    """mean ± std; "(n of k folds)" when fewer than ``k`` folds finished."""
    if not len(v):
        return "-"
    part = f" ({len(v)} of {k} folds)" if k is not None and len(v) < k else ""
    return f"{np.mean(v):.3f} ± {np.std(v):.3f}{part}"


def markdown(summary: dict, models: Sequence[str], levels: Sequence[str], k: Optional[int] = None) -> str:
    """The table: one row per level, test AUC mean ± std over folds per model and the oracle."""
    head = "| level | cohort | " + " | ".join(models) + " | oracle |\n"
    head += "|---" * (len(models) + 3) + "|\n"
    rows = []
    for lv in levels:
        s = summary[lv]
        spec = s["spec"]
        desc = (f"{spec['adjacent']} of {spec['motifs']} adjacent, noise {spec['noise']:g}, {spec['dim']}-d, "
                f"{spec['slides']} slides of {spec['patches'][0]}-{spec['patches'][1]}")
        cells = [_fmt(s["models"][m]["test_auc"], k) if m in s["models"] else "-" for m in models]
        rows.append(f"| {lv} | {desc} | " + " | ".join(cells) + f" | {_fmt(s['oracle'])} |")
    return head + "\n".join(rows) + "\n"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "nocommit"


def run_sweep(out: Path, work: Path, levels: Sequence[str], models: Sequence[str], *, k: int = 5,
              recipe: Optional[str] = None, slides: Optional[int] = None, seed: int = 0, threads: int = 1,
              overrides: Sequence[str] = (), small: bool = True, tag: str = "", train: bool = True,
              folds: Optional[Sequence[int]] = None) -> dict:
    """Generate each level's cohort, cross-validate ``models`` on it through the CLI, score the oracle,
    and write the table, curves and attention summary into ``out``. With ``train`` False nothing is
    trained: the table holds the folds already finished in ``work``. ``folds``: run and tabulate only
    these folds (default all ``k``). Returns the summary."""
    from ssm2d_path.manifest import write_json_atomic
    from ssm2d_nn.fileio import atomic_output

    if folds is not None:
        bad = [f for f in folds if not isinstance(f, int) or not 0 <= f < k]
        if bad or not folds:
            raise ValueError(f"folds: need fold indices in [0, k={k}), got {list(folds)!r}")
        folds = sorted(set(folds))
    for m in models:
        if m not in MODEL_KWARGS:
            raise ValueError(f"models: unknown model {m!r}; expected some of {', '.join(MODEL_KWARGS)}")
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    summary, t_start = {}, time.time()
    with open(work / "sweep.log", "a") as log:
        for lv in levels:
            spec = level_spec(lv, slides, seed)
            cohort, split_dir = work / lv / "cohort", work / lv / "splits"
            if not (cohort / "cohort.json").is_file():
                generate(cohort, spec)
            if not list(split_dir.glob("splits_*.csv")):
                _cli(["splits", "--labels", str(cohort / "labels.csv"), "--out", str(split_dir), "--k", str(k),
                      "--seed", str(seed)], log, threads)
            entry = {"spec": asdict(spec), "oracle": oracle_by_fold(cohort, split_dir, k, folds), "models": {}}
            curves = {}
            for m in models:
                run_dir = work / lv / "runs" / f"{m}{tag}"
                cfg = write_config(work / lv / f"{m}{tag}.yaml", cohort, split_dir, m, run_dir, k, recipe, seed, small)
                t0 = time.time()
                args = ["crossval", "--config", str(cfg)]
                for o in overrides:
                    args += ["--set", o]
                if folds is not None:
                    args += ["--folds", *map(str, folds)]
                if train:
                    _cli(args, log, threads)
                done = [r for r in fold_results(run_dir) if folds is None or r["fold"] in folds]
                if not done:
                    print(f"[sweep] {lv} / {m}: no finished fold", flush=True)
                    continue
                entry["models"][m] = {
                    "test_auc": [f["test"]["auc"] for f in done], "val_auc": [f["val"].get("auc") for f in done],
                    "reported_epoch": [f["reported_epoch"] for f in done],
                    "epochs_run": [len(f["history"]) for f in done], "recipe": done[0].get("recipe"),
                    "run_config": done[0].get("run_config", {}).get("train"),
                    "history": {f["fold"]: f["history"] for f in done},
                    "train_seconds": float(sum(f.get("seconds", float("nan")) for f in done))}
                curves[m] = loss_curves(done)
                if m in SSM_2D:
                    entry["models"][m]["attention"] = attention_on_motifs(run_dir, cohort, split_dir, k, folds)
                print(f"[sweep] {lv} / {m}: test AUC {_fmt(entry['models'][m]['test_auc'], k)} "
                      f"({time.time() - t0:.0f} s)", flush=True)
            entry["curves"] = curves
            if curves:
                plot_curves(curves, out / f"curves_{lv}{tag}.png", f"{lv}: training (solid) and validation (dashed) loss")
            summary[lv] = entry
            write_json_atomic(out / f"results{tag}.json", summary)
    table = markdown(summary, models, levels, k if folds is None else len(folds))
    recipes = sorted({str(e["models"][m]["recipe"]) for e in summary.values() for m in e["models"]})
    att_lines = ["| level | model | attention on pair cells (x uniform) | on all motif cells (x uniform) | "
                 "rank percentile of pair cells |", "|---|---|---|---|---|"]
    for lv, e in summary.items():
        for m, r in e["models"].items():
            if "attention" in r:
                a = r["attention"]
                att_lines.append(f"| {lv} | {m} | {a['pair_mass_ratio']:.2f} | {a['motif_mass_ratio']:.2f} | "
                                 f"{a['pair_rank']:.2f} |")
    sizes = json.dumps({m: MODEL_KWARGS[m] for m in models}) if small else "each model's defaults"
    with atomic_output(out / f"table{tag}.md") as tmp:
        tmp.write_text(f"Test AUC, mean ± std over {f'{k} folds' if folds is None else f'folds {folds} of {k}'} (recipe: {', '.join(recipes)}; overrides: "
                       f"{list(overrides) or 'none'}; model sizes: {sizes})\n\n" + table)
    with atomic_output(out / f"attention{tag}.md") as tmp:
        tmp.write_text("\n".join(att_lines) + "\n")
    write_json_atomic(out / f"sweep{tag}.json", {"levels": list(levels), "models": list(models), "k": k, "recipe": recipe,
                                           "overrides": list(overrides), "seed": seed, "threads": threads,
                                           "slides": slides, "folds": folds, "seconds": time.time() - t_start,
                                           "command": sys.argv})
    print(table, flush=True)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--levels", nargs="+", default=list(LEVELS), help=f"of {', '.join(LEVELS)}")
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--recipe", default=None, help="train.recipe (default: the command's default)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="passed to crossval")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--folds", type=int, nargs="+", default=None, help="run and tabulate only these folds (default all)")
    p.add_argument("--slides", type=int, default=None, help="cohort size of every level (default: the level's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model-sizes", choices=("small", "published"), default="small",
                   help="small: the demo's sizes (dim 32); published: each model's constructor defaults")
    p.add_argument("--tabulate-only", action="store_true",
                   help="train nothing: tabulate the folds already finished in --work")
    p.add_argument("--tag", default="", help="suffix of this sweep's runs and files (several recipes in one folder)")
    p.add_argument("--out", default=None)
    p.add_argument("--work", default=None)
    a = p.parse_args(argv)
    out = Path(a.out) if a.out else ROOT / "benchmarks" / "results" / (
        f"{_dt.date.today().isoformat()}-cpu-mil-sweep-{_commit()}")
    work = Path(a.work) if a.work else out / "work"
    run_sweep(out, work, a.levels, a.models, k=a.k, recipe=a.recipe, slides=a.slides, seed=a.seed,
              threads=a.threads, overrides=a.set, small=a.model_sizes == "small", tag=a.tag,
              train=not a.tabulate_only, folds=a.folds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
