"""Timing and memory helpers shared by the benchmarks: CUDA events, medians, rotating fresh inputs."""

from __future__ import annotations

import datetime
import json
import os
import statistics
import subprocess
import time

from pathlib import Path

import torch


def time_ms(fn, input_sets, device: str = "cuda", warmup: int = 3, reps: int = 30) -> float:
    """Median milliseconds of fn(inputs) over reps, cycling through input_sets (never one cached
    buffer): CUDA events on the GPU, perf_counter on the CPU."""
    for i in range(warmup):
        fn(input_sets[i % len(input_sets)])
    if device == "cuda":
        torch.cuda.synchronize()
    times = []
    for i in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(input_sets[i % len(input_sets)])
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(input_sets[i % len(input_sets)])
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def gpu_time_ms(fn, input_sets, warmup: int = 3, reps: int = 30) -> float:
    """``time_ms`` on the GPU."""
    return time_ms(fn, input_sets, "cuda", warmup, reps)


def peak_mib(fn, inputs) -> tuple[float, float]:
    """(peak allocated during fn including live inputs, peak beyond what was allocated before), MiB."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(inputs)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return peak / 2**20, (peak - before) / 2**20


def copy_bandwidth_gbs(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = gpu_time_ms(lambda _: dst.copy_(src), [None], warmup=3, reps=20)
    del src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e9


def commit_id() -> str:
    """SSM2D_COMMIT (the GPU machine gets a copy of the tree without .git), else git's short HEAD."""
    commit = os.environ.get("SSM2D_COMMIT", "")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True).stdout.strip()
        except OSError:
            commit = ""
    return commit or "unknown"


def header(device: str = "cuda") -> str:
    """One line: device, torch (and CUDA) version, date, commit."""
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        dev = f"{props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, CUDA {torch.version.cuda}"
    else:
        dev = f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads), torch {torch.__version__}"
    return f"device: {dev}, date {datetime.date.today()}, commit {commit_id()}"


def write_report(out_dir, name: str, lines: list, rows: list) -> None:
    """Prints the Markdown table and writes it as OUT/<name>.md, with the rows as OUT/<name>.json."""
    text = "\n".join(lines)
    print(text)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    Path(out_dir, f"{name}.md").write_text(text + "\n")
    Path(out_dir, f"{name}.json").write_text(json.dumps(rows, indent=1))


def same_device_as(authors_device: str) -> bool:
    """Whether this process's GPU is the model the authors measured on ("NVIDIA H200": an H200 of any
    memory size); time ratios across different GPU models mean nothing, so they are left out."""
    if not torch.cuda.is_available():
        return False
    model = authors_device.replace("NVIDIA", "").split()[0].lower()
    return model in torch.cuda.get_device_name(0).lower().split()


def authors_line(authors_device: str, kernel: str, table: str) -> str:
    """The header line naming where the authors' figures come from, and whether ratios are given."""
    line = f"authors' figures: {kernel} on one {authors_device} (spec ANCHORS.md, {table}); "
    if same_device_as(authors_device):
        return line + "ratio = authors' time / ours"
    here = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return line + f"no ratio: measured on {here}, not on the authors' device"


def beside_authors(r: dict, authors_device: str, fwd_ms, fwd_bwd_ms, extra_mib) -> dict:
    """Adds the authors' figures (None: not measured), the ratios authors / ours (None unless this
    GPU is the authors' model) and the forward's share of its floor to a measured case ``r``
    (fwd_ms, fwd_bwd_ms, floor_fwd_ms)."""
    same = same_device_as(authors_device)
    r.update(authors_device=authors_device, authors_fwd_ms=fwd_ms, authors_fwd_bwd_ms=fwd_bwd_ms,
             authors_extra_mib=extra_mib, ratio_fwd=fwd_ms / r["fwd_ms"] if fwd_ms and same else None,
             ratio_fwd_bwd=fwd_bwd_ms / r["fwd_bwd_ms"] if fwd_bwd_ms and r["fwd_bwd_ms"] and same else None,
             fwd_pct_of_floor=100 * r["floor_fwd_ms"] / r["fwd_ms"])
    return r


def authors_table(rows: list) -> list:
    """The Markdown table of cases measured with ``beside_authors``."""
    f = lambda v, fmt: "—" if v is None else format(v, fmt)  # noqa: E731
    lines = ["| case | fwd ms | fwd+bwd ms | authors fwd / fwd+bwd ms | ratio fwd / fwd+bwd | fwd floor ms (% reached) "
             "| peak beyond inputs MiB (authors) | reference fwd+bwd ms |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['fwd_ms']:.3f} | {f(r['fwd_bwd_ms'], '.3f')} | {f(r['authors_fwd_ms'], '')} / "
                     f"{f(r['authors_fwd_bwd_ms'], '')} | {f(r['ratio_fwd'], '.2f')} / {f(r['ratio_fwd_bwd'], '.2f')} | "
                     f"{r['floor_fwd_ms']:.4f} ({r['fwd_pct_of_floor']:.0f}%) | {f(r['extra_mib'], '.0f')} "
                     f"({f(r['authors_extra_mib'], '')}) | {f(r['ref_fwd_bwd_ms'], '.2f')} |")
    return lines


class HostDeviceTrace:
    """A torch.profiler run with CPU and CUDA activities, read back from its Chrome trace: the device
    activities (kernels, copies, memsets) in time order, and for each the host operators around its
    launch (outermost and innermost), so device time and device idle time can be charged to the
    operators that caused them."""

    def __init__(self, prof):
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "trace.json")
            prof.export_chrome_trace(path)
            with open(path) as fh:
                events = [e for e in json.load(fh)["traceEvents"] if e.get("ph") == "X"]
        self.device = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                             key=lambda e: e["ts"])
        self._launches = {e["args"]["correlation"]: e for e in events
                          if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
        self._ops: dict = {}
        for e in events:
            if e.get("cat") in ("cpu_op", "user_annotation"):
                self._ops.setdefault(e["tid"], []).append(e)
        self._owners: dict = {}  # correlation id -> launched_by's answer (each analysis asks again)

    def launched_by(self, activity) -> tuple[str, str]:
        """(outermost, innermost) host operator around the launch of a device activity."""
        corr = activity.get("args", {}).get("correlation")
        if corr not in self._owners:
            self._owners[corr] = self._owner(self._launches.get(corr))
        return self._owners[corr]

    def _owner(self, launch) -> tuple[str, str]:
        if launch is None:
            return "(launch not recorded)", ""
        t = launch["ts"]
        inside = [o for o in self._ops.get(launch["tid"], []) if o["ts"] <= t <= o["ts"] + o["dur"]]
        if not inside:
            return "(no operator)", "(no operator)"
        inside.sort(key=lambda o: (o["ts"], -o["dur"]))
        return inside[0]["name"], inside[-1]["name"]


def device_gaps(trace: HostDeviceTrace, steps: int, top: int = 12, min_us: float = 20.0) -> str:
    """Where the device waits for the host (a trace of a run with CPU and CUDA activities): every
    idle stretch of at least ``min_us`` between consecutive device activities is charged to the host
    operators that launched the activity ending it (HostDeviceTrace.launched_by), per step. The
    profiler's own per-op cost lengthens the gaps somewhat; the ranking is what this is for."""
    device = trace.device
    total, charged = 0.0, {}
    end = device[0]["ts"] + device[0]["dur"] if device else 0.0
    for e in device[1:]:
        gap = e["ts"] - end
        if gap >= min_us:
            total += gap
            key = trace.launched_by(e)
            n, us = charged.get(key, (0, 0.0))
            charged[key] = (n + 1, us + gap)
        end = max(end, e["ts"] + e["dur"])
    lines = [f"device idle in gaps >= {min_us:.0f} us: {total / steps / 1e3:.2f} ms per step", "",
             "| launched by (outermost op) | innermost op | gaps per step | idle ms per step |", "|---|---|---|---|"]
    for (outer, inner), (n, us) in sorted(charged.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"| {outer[:70]} | {inner[:50]} | {n / steps:.1f} | {us / steps / 1e3:.3f} |")
    return "\n".join(lines)


def device_time_by_operator(trace: HostDeviceTrace, steps: int, top: int = 12) -> str:
    """Device time per step charged to (kernel, the host operators that launched it): which model
    operation each of the heaviest kernels belongs to (a generic elementwise kernel says nothing by
    its name). Same trace as device_gaps."""
    charged: dict = {}
    for e in trace.device:
        key = (e["name"], *trace.launched_by(e))
        n, us = charged.get(key, (0, 0.0))
        charged[key] = (n + 1, us + e["dur"])
    lines = ["| kernel | launched by (outermost op) | innermost op | calls per step | ms per step |",
             "|---|---|---|---|---|"]
    for (name, outer, inner), (n, us) in sorted(charged.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"| {name[:60]} | {outer[:60]} | {inner[:40]} | {n / steps:.1f} | {us / steps / 1e3:.3f} |")
    return "\n".join(lines)
