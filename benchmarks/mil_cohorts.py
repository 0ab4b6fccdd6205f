"""Synthetic MIL cohorts where only the 2D arrangement of two rare motifs carries the label.

A harder, tunable relative of the ``ssm2d-path demo`` classification cohort, written as TRIDENT
feature files (``<out>/20x_256px_0px_overlap/features_synthetic/<slide>.h5``) with realistic
coordinates: each slide is a tissue blob of ``patches`` cells (drawn per slide), half of the slides
"40x-native" (level-0 stride 512 px) and half "20x-native" (256 px), at a random level-0 offset.

Every slide holds ``motifs`` A patches and ``motifs`` B patches among "normal" tissue. Features are
(F,) vectors: the patch type's direction plus Gaussian noise of std ``noise`` per dimension (normal:
norm ``normal_norm``; A and B: norm ``motif_norm``, orthogonal to each other and to normal). In a
class-1 slide ``adjacent`` of the A patches sit directly next to a B (a 4-neighbour, on the side
``orientation`` says), the other motifs scattered; in a class-0 slide no motif touches another
(8-neighbourhood). Patch counts of every type and slide sizes do not depend on the class, so a
permutation-invariant model stays at chance in expectation.

``oracle_scores`` is the reference detector: given the two motif directions, it projects every patch
on them and sums, over the ``k`` best 4-adjacent cell pairs, the smaller of the A projection of one
cell and the B projection of the other (see :func:`pair_statistic`).

    python benchmarks/mil_cohorts.py --out cohort/ --slides 120 --adjacent 3 --motifs 5 --noise 1 --dim 64
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np

ENCODER = "synthetic"
GRID_FOLDER = "20x_256px_0px_overlap"
ORIENTATIONS = ("vertical", "horizontal", "any")
# (dr, dc) from an A cell to its B partner, per orientation.
_OFFSETS = {"vertical": [(1, 0)], "horizontal": [(0, 1)], "any": [(1, 0), (-1, 0), (0, 1), (0, -1)]}


@dataclass
class CohortSpec:
    """The knobs of one cohort.

    slides: number of slides (= patients), half of each class (odd: class 0 gets the extra one).
    motifs: m, the A patches and the B patches of every slide.
    adjacent: k (0 <= k <= m), the A-B pairs that touch in a class-1 slide.
    noise: per-dimension std of the features around their type's direction.
    dim: feature dimension F (>= 3).
    patches: (min, max) tissue patches per slide, drawn uniformly per slide.
    orientation: where the B of a touching pair lies from its A: vertical (below), horizontal (to the
        right) or any of the four sides.
    motif_norm, normal_norm: norms of the A/B and normal directions.
    seed: everything (directions, slides, noise) follows it.
    """

    slides: int = 120
    motifs: int = 5
    adjacent: int = 3
    noise: float = 1.0
    dim: int = 64
    patches: tuple[int, int] = (300, 2500)
    orientation: str = "any"
    motif_norm: float = 3.0
    normal_norm: float = 1.0
    seed: int = 0

    def check(self) -> None:
        """Raises ValueError naming the first argument out of range."""
        if not isinstance(self.slides, int) or self.slides < 4:
            raise ValueError(f"slides: need an integer >= 4, got {self.slides!r}")
        if not isinstance(self.motifs, int) or self.motifs < 1:
            raise ValueError(f"motifs: need an integer >= 1, got {self.motifs!r}")
        if not isinstance(self.adjacent, int) or not 0 <= self.adjacent <= self.motifs:
            raise ValueError(f"adjacent: need an integer in [0, motifs={self.motifs}], got {self.adjacent!r}")
        if not (isinstance(self.noise, (int, float)) and math.isfinite(self.noise) and self.noise >= 0):
            raise ValueError(f"noise: need a finite number >= 0, got {self.noise!r}")
        if not isinstance(self.dim, int) or self.dim < 3:
            raise ValueError(f"dim: need an integer >= 3 (three orthogonal directions), got {self.dim!r}")
        lo, hi = self.patches
        if not (isinstance(lo, int) and isinstance(hi, int) and 4 * self.motifs * 9 <= lo <= hi):
            raise ValueError(f"patches: need integers lo <= hi with lo >= {36 * self.motifs} (room for "
                             f"{2 * self.motifs} separated motifs), got {self.patches!r}")
        if self.orientation not in ORIENTATIONS:
            raise ValueError(f"orientation: expected one of {ORIENTATIONS}, got {self.orientation!r}")
        for key in ("motif_norm", "normal_norm"):
            v = getattr(self, key)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{key}: need a finite number >= 0, got {v!r}")


# ------------------------------------------------------------------------------------------ geometry

def tissue_blob(rng: np.random.Generator, n_target: int) -> np.ndarray:
    """(H, W) bool tissue mask of about ``n_target`` cells: a rotated ellipse with a wobbly border
    (aspect ratio 0.6-1.6), cropped to its bounding box."""
    aspect = rng.uniform(0.6, 1.6)
    area = n_target / (math.pi / 4 * 0.95)  # an ellipse fills pi/4 of its box
    h = max(6, int(round(math.sqrt(area * aspect))) + 2)
    w = max(6, int(round(math.sqrt(area / aspect))) + 2)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    ry, rx = (h - 2) / 2, (w - 2) / 2
    th = rng.uniform(-0.3, 0.3)
    dy, dx = (yy - cy) / ry, (xx - cx) / rx
    u = dx * math.cos(th) + dy * math.sin(th)
    v = -dx * math.sin(th) + dy * math.cos(th)
    ang = np.arctan2(v, u)
    wobble = sum(rng.uniform(0, 0.06) * np.cos(f * ang + rng.uniform(0, 2 * np.pi)) for f in (2, 3, 5))
    mask = u ** 2 + v ** 2 < (1 + wobble) ** 2
    rows, cols = np.nonzero(mask)
    return mask[rows.min(): rows.max() + 1, cols.min(): cols.max() + 1]


def place_motifs(rng: np.random.Generator, tissue: np.ndarray, n_pairs: int, n_single: int, orientation: str,
                 tries: int = 20000) -> Optional[np.ndarray]:
    """(H, W) int8 map of patch types (0 normal, 1 A, 2 B) on ``tissue``: ``n_pairs`` touching A-B pairs
    (B at an offset of ``orientation`` from its A) and ``n_single`` A and ``n_single`` B placed singly.
    No motif touches another (8-neighbourhood) except the two cells of a pair. None if they do not fit."""
    h, w = tissue.shape
    kind = np.zeros((h, w), np.int8)
    blocked = ~tissue
    units = [("pair",)] * n_pairs + [("one", 1)] * n_single + [("one", 2)] * n_single
    offsets = _OFFSETS[orientation]
    for i in rng.permutation(len(units)):
        unit = units[i]
        for _ in range(tries):
            r, c = int(rng.integers(0, h)), int(rng.integers(0, w))
            if unit[0] == "pair":
                dr, dc = offsets[int(rng.integers(0, len(offsets)))]
                cells = [(r, c), (r + dr, c + dc)]
            else:
                cells = [(r, c)]
            if any(not (0 <= rr < h and 0 <= cc < w) or blocked[rr, cc] for rr, cc in cells):
                continue
            if unit[0] == "pair":
                kind[cells[0]], kind[cells[1]] = 1, 2
            else:
                kind[cells[0]] = unit[1]
            for rr, cc in cells:
                blocked[max(rr - 1, 0): rr + 2, max(cc - 1, 0): cc + 2] = True
            break
        else:
            return None
    return kind


def adjacent_pairs(kind: np.ndarray) -> int:
    """Number of (A, B) cells that are 4-neighbours (any side)."""
    a, b = kind == 1, kind == 2
    n = np.sum(a[:-1] & b[1:]) + np.sum(b[:-1] & a[1:]) + np.sum(a[:, :-1] & b[:, 1:]) + np.sum(b[:, :-1] & a[:, 1:])
    return int(n)


def directions(rng: np.random.Generator, spec: CohortSpec) -> np.ndarray:
    """(3, F): normal, A, B directions, orthonormal up to their norms."""
    q, _ = np.linalg.qr(rng.normal(size=(spec.dim, 3)))
    return np.stack([spec.normal_norm * q[:, 0], spec.motif_norm * q[:, 1], spec.motif_norm * q[:, 2]])


def _slide(rng: np.random.Generator, spec: CohortSpec, label: int):
    """(tissue (H, W) bool, kind (H, W) int8) of one slide of class ``label``."""
    n_pairs = spec.adjacent if label == 1 else 0
    while True:
        n_target = int(rng.integers(spec.patches[0], spec.patches[1] + 1))
        tissue = tissue_blob(rng, n_target)
        kind = place_motifs(rng, tissue, n_pairs, spec.motifs - n_pairs, spec.orientation)
        if kind is not None:
            return tissue, kind


def _write(path: Path, rng: np.random.Generator, feats: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> None:
    """One TRIDENT file (written atomically by write_trident): 20x- or 40x-native geometry."""
    from ssm2d_path.io import write_trident

    native40 = bool(rng.integers(0, 2))
    stride = 512 if native40 else 256
    x0, y0 = int(rng.integers(2, 60)) * stride, int(rng.integers(2, 60)) * stride
    coords = np.stack([x0 + cols * stride, y0 + rows * stride], 1).astype(np.int64)
    write_trident(path, feats, coords, patch_size=256, patch_size_level0=stride,
                  level0_magnification=40 if native40 else 20, target_magnification=20, overlap=0,
                  level0_width=int(coords[:, 0].max() + stride + x0), level0_height=int(coords[:, 1].max() + stride + y0),
                  encoder=ENCODER, extra_attrs={"synthetic": 1})


def generate(out: os.PathLike, spec: CohortSpec) -> dict:
    """Write the cohort under ``out`` and return its paths.

    Layout: ``<out>/20x_256px_0px_overlap/features_synthetic/<slide>.h5`` (features (N, F) float32,
    coords (N, 2) int64 in raster order), ``<out>/labels.csv`` (case_id, slide_id, label) and
    ``<out>/cohort.json`` (the spec, the three directions and, per slide, its label, patch count and the
    cells of its A and B patches as (row, col) on the tissue-cropped grid).
    Returns {"root", "features", "labels", "truth"}.
    """
    import pandas as pd

    from ssm2d_nn.fileio import atomic_output

    spec.check()
    out = Path(out)
    froot = out / GRID_FOLDER / f"features_{ENCODER}"
    froot.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    dirs = directions(rng, spec)
    labels = [1] * (spec.slides // 2) + [0] * (spec.slides - spec.slides // 2)
    labels = [labels[i] for i in rng.permutation(spec.slides)]
    rows_out, truth = [], {}
    for j, label in enumerate(labels):
        tissue, kind = _slide(rng, spec, label)
        r, c = np.nonzero(tissue)  # raster order
        k = kind[r, c]
        feats = (dirs[k] + rng.normal(0.0, spec.noise, (len(r), spec.dim))).astype(np.float32)
        sid = f"slide_{j:04d}"
        _write(froot / f"{sid}.h5", rng, feats, r, c)
        rows_out.append({"case_id": sid, "slide_id": sid, "label": label})
        truth[sid] = {"label": label, "n_patches": int(len(k)), "adjacent_pairs": adjacent_pairs(kind),
                      "A": np.argwhere(kind == 1).tolist(), "B": np.argwhere(kind == 2).tolist()}
    labels_csv = out / "labels.csv"
    with atomic_output(labels_csv) as tmp:
        pd.DataFrame(rows_out).to_csv(tmp, index=False)
    with atomic_output(out / "cohort.json") as tmp:
        tmp.write_text(json.dumps({"spec": asdict(spec), "directions": dirs.tolist(), "slides": truth}))
    return {"root": out, "features": froot, "labels": labels_csv, "truth": truth}


# ------------------------------------------------------------------------------------------ oracle

def pair_statistic(za: np.ndarray, zb: np.ndarray, k: int) -> float:
    """Sum of the ``k`` largest ``min(za_i, zb_j)`` over ordered 4-adjacent cell pairs (i, j).

    Args:
        za, zb: (H, W) projections of each cell's feature on the unit A and B directions (NaN where
            there is no tissue), in units of the noise std.
        k: how many touching pairs to look for (>= 1).
    A touching A-B pair scores about the motif norm over the noise std on both cells; a pair of
    noise cells scores about 0, an A next to a noise cell too. (On the 120-slide, 3-of-5 cohort this
    reached a higher AUC than the log of the summed pair likelihood ratios, whose heavy tail the
    noise pairs dominate, and than the maximum alone.)
    """
    if k < 1:
        raise ValueError(f"k: need >= 1, got {k}")
    terms = []
    for a, b in ((za[:-1], zb[1:]), (za[1:], zb[:-1]), (za[:, :-1], zb[:, 1:]), (za[:, 1:], zb[:, :-1])):
        s = np.minimum(a, b)
        terms.append(s[np.isfinite(s)])
    t = np.concatenate(terms)
    if t.size == 0:
        return float("-inf")
    return float(np.sort(t)[-k:].sum())


def oracle_scores(feature_dir: os.PathLike, directions_: np.ndarray, noise: float, k: int = 1) -> dict:
    """{slide id: oracle score} for every ``*.h5`` in ``feature_dir`` (read with ssm2d_path.io.read_slide):
    the :func:`pair_statistic` (``k`` pairs) of the slide given the A and B directions (rows 1 and 2 of
    ``directions_`` (3, F)) and the noise std."""
    from ssm2d_path.io import read_slide

    a, b = directions_[1], directions_[2]
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    out = {}
    for path in sorted(Path(feature_dir).glob("*.h5")):
        g = read_slide(path)
        x = g.features.double().numpy()
        za = np.full(g.shape, np.nan)
        zb = np.full(g.shape, np.nan)
        za[g.rows, g.cols] = x @ a / na / max(noise, 1e-12)
        zb[g.rows, g.cols] = x @ b / nb / max(noise, 1e-12)
        out[g.slide_id] = pair_statistic(za, zb, k)
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = CohortSpec()
    p.add_argument("--out", required=True)
    p.add_argument("--slides", type=int, default=d.slides)
    p.add_argument("--motifs", type=int, default=d.motifs)
    p.add_argument("--adjacent", type=int, default=d.adjacent)
    p.add_argument("--noise", type=float, default=d.noise)
    p.add_argument("--dim", type=int, default=d.dim)
    p.add_argument("--patches", type=int, nargs=2, default=list(d.patches), metavar=("MIN", "MAX"))
    p.add_argument("--orientation", choices=ORIENTATIONS, default=d.orientation)
    p.add_argument("--motif-norm", type=float, default=d.motif_norm)
    p.add_argument("--seed", type=int, default=d.seed)
    return p


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    spec = CohortSpec(slides=a.slides, motifs=a.motifs, adjacent=a.adjacent, noise=a.noise, dim=a.dim,
                      patches=tuple(a.patches), orientation=a.orientation, motif_norm=a.motif_norm, seed=a.seed)
    res = generate(a.out, spec)
    n = [t["n_patches"] for t in res["truth"].values()]
    print(f"{len(n)} slides, {min(n)}-{max(n)} patches (mean {np.mean(n):.0f}) in {res['features']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
