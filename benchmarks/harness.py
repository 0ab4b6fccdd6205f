"""Timing and memory helpers shared by the benchmarks: CUDA events, medians, rotating fresh inputs."""

from __future__ import annotations

import statistics
import subprocess

import torch


def gpu_time_ms(fn, input_sets, warmup: int = 3, reps: int = 30) -> float:
    """Median milliseconds of fn(inputs) over reps, cycling through input_sets (never one cached buffer)."""
    for i in range(warmup):
        fn(input_sets[i % len(input_sets)])
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(input_sets[i % len(input_sets)])
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


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


def header() -> str:
    props = torch.cuda.get_device_properties(0)
    import os

    commit = os.environ.get("SSM2D_COMMIT", "")
    if not commit:  # the GPU machine gets a copy of the tree without .git: pass SSM2D_COMMIT there
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True).stdout.strip()
        except OSError:
            commit = "unknown"
    import datetime

    return (f"device: {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}, date {datetime.date.today()}, commit {commit or 'unknown'}")
