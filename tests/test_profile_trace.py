"""benchmarks/harness.py's trace analyses (device_gaps, device_time_by_operator) on random synthetic
Chrome traces, against a brute-force timeline at 1 us resolution."""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import harness  # noqa: E402


class _FakeProfile:
    """What the analyses use of a torch.profiler.profile: export_chrome_trace."""

    def __init__(self, events):
        self.events = events

    def export_chrome_trace(self, path):
        Path(path).write_text(json.dumps({"traceEvents": self.events}))


def _random_trace(rng: random.Random):
    """Host operators (nested, on two threads), launches inside them, device activities in time order
    (integer microseconds, some overlapping), each tied to its launch by a correlation id."""
    events, device, launches = [], [], {}
    t_host = 0
    for k in range(rng.randint(5, 12)):
        tid = rng.choice([1, 2])
        outer_ts, outer_dur = t_host, rng.randint(40, 120)
        events.append({"ph": "X", "cat": "cpu_op", "name": f"outer{k}", "ts": outer_ts, "dur": outer_dur, "tid": tid})
        inner_ts = outer_ts + rng.randint(1, 10)
        events.append({"ph": "X", "cat": "cpu_op", "name": f"inner{k}", "ts": inner_ts, "dur": 20, "tid": tid})
        for j in range(rng.randint(1, 3)):
            corr = len(launches) + 1
            ts = rng.choice([inner_ts + rng.randint(0, 19), outer_ts + outer_dur - rng.randint(1, 5)])
            launches[corr] = (ts, tid)
            events.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": 1,
                           "tid": tid, "args": {"correlation": corr}})
        t_host += outer_dur + rng.randint(0, 20)
    t_dev = 0
    for corr in sorted(launches):
        t_dev += rng.choice([0, rng.randint(1, 60), -rng.randint(0, 5)])
        t_dev = max(t_dev, 0)
        dur = rng.randint(1, 30)
        device.append({"ph": "X", "cat": rng.choice(["kernel", "kernel", "gpu_memcpy"]), "name": f"k{corr % 4}",
                       "ts": t_dev, "dur": dur, "tid": 99, "args": {"correlation": corr}})
        t_dev += dur
    return events + device, device, launches


def _owner(events, launches, corr):
    ts, tid = launches[corr]
    inside = [e for e in events if e.get("cat") == "cpu_op" and e["tid"] == tid and e["ts"] <= ts <= e["ts"] + e["dur"]]
    if not inside:
        return "(no operator)", "(no operator)"
    outer = max(inside, key=lambda e: (-e["ts"], e["dur"]))
    inner = max(inside, key=lambda e: (e["ts"], -e["dur"]))
    return outer["name"], inner["name"]


@pytest.mark.parametrize("seed", range(6))
def test_gaps_and_device_time_match_a_brute_force_timeline(seed):
    rng = random.Random(seed * 7919 + random.randrange(1 << 20))
    events, device, launches = _random_trace(rng)
    min_us = rng.choice([1, 5, 20])
    # brute force: which microseconds the device is busy; each idle run ends where an activity starts
    end = max(e["ts"] + e["dur"] for e in device)
    busy = [False] * (end + 1)
    for e in device:
        for t in range(e["ts"], e["ts"] + e["dur"]):
            busy[t] = True
    first = min(e["ts"] for e in device)
    expect_gaps: dict = {}
    t = first
    while t < end:
        if busy[t]:
            t += 1
            continue
        s = t
        while t < end and not busy[t]:
            t += 1
        if t - s >= min_us:
            starter = min((e for e in device if e["ts"] == t), key=lambda e: device.index(e))
            key = _owner(events, launches, starter["args"]["correlation"])
            n, us = expect_gaps.get(key, (0, 0))
            expect_gaps[key] = (n + 1, us + (t - s))
    total = sum(us for _, us in expect_gaps.values())
    out = harness.device_gaps(harness.HostDeviceTrace(_FakeProfile(events)), steps=1, top=100, min_us=min_us)
    assert f"{total / 1e3:.2f} ms per step" in out
    rows = {(m[0], m[1]): (float(m[2]), float(m[3]))
            for m in re.findall(r"^\| (\S+) \| (\S+) \| ([\d.]+) \| ([\d.]+) \|$", out, re.M)}
    assert rows == {k: (float(n), round(us / 1e3, 3)) for k, (n, us) in expect_gaps.items()}

    expect_time: dict = {}
    for e in device:
        key = (e["name"], *_owner(events, launches, e["args"]["correlation"]))
        n, us = expect_time.get(key, (0, 0))
        expect_time[key] = (n + 1, us + e["dur"])
    out = harness.device_time_by_operator(harness.HostDeviceTrace(_FakeProfile(events)), steps=1, top=1000)
    rows = {(m[0], m[1], m[2]): (float(m[3]), float(m[4]))
            for m in re.findall(r"^\| (\S+) \| (\S+) \| (\S+) \| ([\d.]+) \| ([\d.]+) \|$", out, re.M)}
    assert rows == {k: (float(n), round(us / 1e3, 3)) for k, (n, us) in expect_time.items()}
