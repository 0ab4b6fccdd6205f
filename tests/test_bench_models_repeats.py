"""benchmarks/bench_models.py --repeat: the medians over round-robin repeats and the ratio table, from
random synthetic rows (the GPU measurements themselves run on a GPU machine)."""

from __future__ import annotations

import importlib.util
import random
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    pytest.importorskip("ssm2d_vision")  # before timm, as bench_models imports them
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("bench_models_under_test", ROOT / "benchmarks" / "bench_models.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return mod


def _row(rng, name):
    fast, slow = rng.uniform(100, 9000), rng.uniform(50, 100)
    layout = rng.choice(["cf", "cl"])
    return {"model": name, "params": 1000, "infer_128": (fast, rng.uniform(0.5, 2.0)), "layout_128": layout,
            "other_128": [("cl" if layout == "cf" else "cf", slow)], "train": (rng.uniform(50, 2000), rng.uniform(1, 6)),
            "layout_train": rng.choice(["cf", "cl"]), "other_train": [("cf", rng.uniform(10, 50))]}


def test_merge_takes_medians_largest_peaks_and_the_usual_layout(bench):
    rng = random.Random()
    runs = [_row(rng, "m") for _ in range(rng.choice([3, 5]))]
    merged = bench.merge_repeats(runs)
    assert merged["infer_128"][0] == statistics.median(r["infer_128"][0] for r in runs)
    assert merged["infer_128"][1] == max(r["infer_128"][1] for r in runs)
    assert merged["train"][0] == statistics.median(r["train"][0] for r in runs)
    counts = {k: sum(r["layout_train"] == k for r in runs) for k in ("cf", "cl")}
    assert counts[merged["layout_train"]] == max(counts.values())
    others = [ips for r in runs for name, ips in r["other_train"] if name == "cf"]
    assert merged["other_train"] == [("cf", statistics.median(others))]
    assert bench.merge_repeats(runs[:1]) is runs[0]


def test_ratios_are_taken_within_each_repeat(bench):
    rng = random.Random()
    names = ["convnext_tiny", "a", "b"]
    repeats = [{n: _row(rng, n) for n in names} for _ in range(3)]
    per_model = bench.ratios(repeats, "convnext_tiny", 128)
    assert set(per_model) == {"a", "b"}
    for n in ("a", "b"):
        expect = [(rows[n]["infer_128"][0] / rows["convnext_tiny"]["infer_128"][0],
                   rows[n]["train"][0] / rows["convnext_tiny"]["train"][0]) for rows in repeats]
        got = [v for pair in per_model[n] for v in pair]
        assert got == pytest.approx([v for pair in expect for v in pair], rel=1e-12)
    text = bench.ratio_table(per_model, "convnext_tiny", 128, 64)
    trains = sorted(p[1] for p in per_model["a"])
    assert f"| a | {statistics.median(p[0] for p in per_model['a']):.3f} [" in text
    assert f"{trains[1]:.3f} [{trains[0]:.3f}-{trains[2]:.3f}] |" in text
    assert "over 3 repeat(s)" in text
