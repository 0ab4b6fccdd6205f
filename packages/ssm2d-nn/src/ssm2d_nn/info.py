"""Environment report: what is installed, what was compiled in, which backend runs where.

``python -m ssm2d_nn.info [--selftest]`` prints it; attach it to bug reports.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import platform
import sys

import torch

from . import _kernels
from .backends import kernel_unavailable_reason

PACKAGES = ("ssm2d-kernels", "ssm2d-nn", "ssm2d-vision", "ssm2d-path")


def _dist_version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def collect(selftest: bool = False) -> dict:
    """Facts about this environment as a dict (JSON-serialisable)."""
    info: dict = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_cuda_devices": torch.cuda.device_count(),
        "packages": {name: _dist_version(name) for name in PACKAGES},
        "kernels": None,
        "backends": {},
    }
    devices = [torch.device("cpu")] + [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    for dev in devices:
        reason = kernel_unavailable_reason(dev)
        info["backends"][str(dev)] = "kernel" if reason is None else f"reference ({reason})"
    if not _kernels.STATUS.available:
        return info
    import ssm2d_kernels as k

    kinfo = k.build_info()
    kinfo["cuda_device_count"] = k.cuda_device_count()
    kinfo["cuda_driver_version"] = k.cuda_driver_version()
    kinfo["cpu_threads"] = k.get_num_threads()
    kinfo["devices"] = [k.cuda_device_properties(i) for i in range(kinfo["cuda_device_count"])]
    if selftest:
        kinfo["cpu_selftest"] = k.cpu_selftest()
        kinfo["cuda_selftest"] = [k.cuda_selftest(i) for i in range(kinfo["cuda_device_count"])]
    info["kernels"] = kinfo
    return info


def format_report(info: dict, extra_rows: list[tuple[str, str]] | None = None) -> str:
    """The report as aligned 'name  value' lines; ``extra_rows`` are appended in the same layout."""
    rows: list[tuple[str, str]] = [
        ("python", info["python"]),
        ("platform", info["platform"]),
        ("torch", f"{info['torch']} (CUDA {info['torch_cuda'] or 'none'}, {info['torch_cuda_devices']} device(s))"),
    ]
    rows += [(name, version or "not installed") for name, version in info["packages"].items()]
    k = info["kernels"]
    if k is None:
        rows.append(("kernels", f"unavailable: {_kernels.STATUS.problem}; fix: {_kernels.STATUS.hint}"))
    else:
        archs = ", ".join(k["cuda_architectures"]) or "none"
        rows += [
            ("kernels build", f"CUDA {k['cuda_runtime_version'] or 'not compiled'}; architectures: {archs}"),
            ("kernels CPU threads", str(k["cpu_threads"])),
            ("CUDA devices", str(k["cuda_device_count"])),
        ]
        for d in k["devices"]:
            rows.append(
                (
                    f"  cuda:{d['index']}",
                    f"{d['name']}, sm_{d['capability'][0]}{d['capability'][1]}, {d['multiprocessors']} SMs, "
                    f"{d['total_memory'] / 2**30:.1f} GiB",
                )
            )
        if "cpu_selftest" in k:
            s = k["cpu_selftest"]
            rows.append(("CPU self-test", f"{'passed' if s['ok'] else 'FAILED'} ({s['threads']} threads)"))
            for i, s in enumerate(k["cuda_selftest"]):
                rows.append(
                    (f"CUDA self-test cuda:{i}", f"{'passed' if s['ok'] else 'FAILED'} (max error {s['max_abs_error']:.1e})")
                )
    rows += [(f"backend on {dev}", choice) for dev, choice in info["backends"].items()]
    rows += extra_rows or []
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ssm2d_nn.info", description=__doc__.splitlines()[0])
    parser.add_argument("--selftest", action="store_true", help="also run the CPU and CUDA self-tests")
    args = parser.parse_args(argv)
    info = collect(selftest=args.selftest)
    print(format_report(info))
    k = info["kernels"]
    failed = k is not None and args.selftest and (
        not k["cpu_selftest"]["ok"] or not all(s["ok"] for s in k["cuda_selftest"])
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
