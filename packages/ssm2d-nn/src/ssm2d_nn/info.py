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
        ok_devices = [dev for dev in devices if kernel_unavailable_reason(dev) is None]
        info["kernel_checks"] = {f"{name} kernel on {dev}": check(dev) for dev in ok_devices
                                 for name, check in (("scan2d", scan2d_check), ("wavefront2d", wavefront2d_check))}
    info["kernels"] = kinfo
    return info


def _check_against_reference(op, reference, args: dict, params: tuple, device: torch.device, **kw) -> dict:
    """Runs ``op`` (kernel backend) on ``device`` and ``reference`` in float64 on the CPU; returns the
    relative errors of the output and of the gradient of its sum w.r.t. u, and the kernel's time."""
    import time

    ref_u = args["u"].clone().requires_grad_(True)
    ref = reference(**dict(args, u=ref_u), **kw)
    (ref_grad,) = torch.autograd.grad(ref.sum(), ref_u)
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    dev_args = {k: v.to(device, torch.float32 if (k in params and dtype != torch.float64) else dtype)
                for k, v in args.items()}
    dev_args["u"].requires_grad_(True)
    t0 = time.perf_counter()
    out = op(**dev_args, **kw, backend="kernel")
    (grad,) = torch.autograd.grad(out.sum(), dev_args["u"])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    rel = lambda a, r: float((a.double().cpu() - r).norm() / r.norm())  # noqa: E731
    return {"dtype": str(dtype).removeprefix("torch."), "out_rel_err": rel(out.detach(), ref.detach()),
            "grad_rel_err": rel(grad, ref_grad), "seconds": elapsed}


def _generator(seed: int | None) -> torch.Generator:
    import time

    return torch.Generator().manual_seed(seed if seed is not None else int(time.time_ns() % 2**31))


def scan2d_check(device: torch.device, seed: int | None = None) -> dict:
    """scan2d's kernel on a random 24x31 problem (all options on, origin "br", columns first) against
    the float64 reference."""
    from .ops import scan2d, scan2d_reference

    gen = _generator(seed)
    b, d, n, g, h, w = 2, 16, 4, 2, 24, 31
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    args = dict(u=rnd(b, d, h, w), delta=rnd(b, d, h, w) * 0.5 - 1, A=-(rnd(d, n).abs() + 0.1), B=rnd(b, g, n, h, w),
                C=rnd(b, g, n, h, w), D=rnd(d), z=rnd(b, d, h, w), delta_bias=rnd(d) * 0.3)
    return _check_against_reference(scan2d, scan2d_reference, args, ("A", "D", "delta_bias"), device,
                                    delta_softplus=True, origin="br", order="vh")


def wavefront2d_check(device: torch.device, seed: int | None = None) -> dict:
    """wavefront2d's kernel on a random 19x23 problem (groups, D, origin "br") against the float64
    reference."""
    from .ops import wavefront2d, wavefront2d_reference

    gen = _generator(seed)
    b, h, w, e, n, g = 2, 19, 23, 8, 4, 2
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    pos = lambda *s: torch.rand(*s, generator=gen, dtype=torch.float64) * 0.5 + 0.05  # noqa: E731
    args = dict(u=rnd(b, h, w, e), dT=pos(b, h, w, e), dL=pos(b, h, w, e), AT=-(rnd(e, n).abs() + 0.1),
                AL=-(rnd(e, n).abs() + 0.1), BT=rnd(b, h, w, g, n), BL=rnd(b, h, w, g, n), C=rnd(b, h, w, g, n), D=rnd(e))
    return _check_against_reference(wavefront2d, wavefront2d_reference, args, ("AT", "AL", "D"), device, origin="br")


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
    for label, r in info.get("kernel_checks", {}).items():
        ok = r["out_rel_err"] < (1e-10 if r["dtype"] == "float64" else 1e-4) and r["grad_rel_err"] < (
            1e-10 if r["dtype"] == "float64" else 1e-3)
        rows.append((label, f"{'passed' if ok else 'FAILED'}: {r['dtype']} vs float64 reference, "
                     f"output error {r['out_rel_err']:.1e}, du error {r['grad_rel_err']:.1e}, "
                     f"{r['seconds'] * 1e3:.1f} ms fwd+bwd"))
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
        or "FAILED" in format_report(info)
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
