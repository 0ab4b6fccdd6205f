"""ssm2d-kernels: CPU and CUDA kernels of the 2D selective scans, free of any framework.

The compiled core takes raw pointers, shapes, strides, a dtype and the caller's CUDA stream; it
does not link libtorch, so one wheel serves every torch (or CuPy) version. This module is its
Python face: build and device queries here, the scan entry points in later modules.
"""

from __future__ import annotations

from .__about__ import __version__

try:
    from . import _C
except ImportError as exc:  # pragma: no cover - only a broken install gets here
    raise ImportError(
        "ssm2d_kernels: the compiled module ssm2d_kernels._C could not be loaded "
        f"({exc}). Reinstall the wheel: pip install --force-reinstall 'ssm2d-kernels=={__version__}'"
    ) from exc

if _C.__version__ != __version__:  # a stale build next to newer Python files
    raise ImportError(
        f"ssm2d_kernels: the compiled module is version {_C.__version__} but the Python package is "
        f"{__version__}; rebuild it: pip install --force-reinstall 'ssm2d-kernels=={__version__}'"
    )

__all__ = [
    "__version__",
    "build_info",
    "cpu_selftest",
    "cuda_device_count",
    "cuda_device_properties",
    "cuda_driver_version",
    "cuda_selftest",
    "get_num_threads",
    "set_num_threads",
]

cuda_device_count = _C.cuda_device_count
cuda_driver_version = _C.cuda_driver_version
get_num_threads = _C.get_num_threads
set_num_threads = _C.set_num_threads


def _version_string(v: int) -> str | None:
    """13000 -> '13.0' (CUDA's integer encoding: 1000*major + 10*minor)."""
    return f"{v // 1000}.{(v % 1000) // 10}" if v > 0 else None


def _architectures(cmake_list: str) -> list[str]:
    """CMake's '80-real;90-real;120-virtual' (as built in: commas) -> ['sm_80', 'sm_90', 'compute_120']."""
    out = []
    for item in filter(None, cmake_list.replace(",", ";").split(";")):
        arch, _, kind = item.partition("-")
        if kind == "virtual":
            out.append(f"compute_{arch}")
        elif kind == "real":
            out.append(f"sm_{arch}")
        else:  # a bare number builds both the machine code and the PTX
            out += [f"sm_{arch}", f"compute_{arch}"]
    return out


def build_info() -> dict:
    """What this wheel was built with.

    Returns a dict with ``version`` (str), ``cuda`` (bool: CUDA kernels compiled in),
    ``cuda_architectures`` (list such as ``['sm_90', 'compute_90']``, empty without CUDA),
    ``cuda_runtime_version`` (str such as ``'13.0'``, or None without CUDA; the runtime is linked
    statically so this is the build's, not the machine's), and ``cxx_compiler`` (str).
    """
    raw = dict(_C.build_info_raw())
    return {
        "version": __version__,
        "cuda": bool(raw["cuda"]),
        "cuda_architectures": _architectures(raw["cuda_architectures"]),
        "cuda_runtime_version": _version_string(int(raw["cuda_runtime_version"])),
        "cxx_compiler": raw.get("cxx_compiler", "unknown"),
    }


def cuda_device_properties(device: int = 0) -> dict:
    """Name, compute capability, multiprocessors, memory, L2 and opt-in shared memory of a device.

    Raises ValueError for an index outside ``[0, cuda_device_count())`` and RuntimeError in a
    CPU-only build.
    """
    return dict(_C.cuda_device_properties(int(device)))


def cuda_selftest(device: int = 0, elements: int = 1 << 20) -> dict:
    """Runs a small kernel on ``device`` on a fresh non-blocking stream and checks it on the host.

    Proves the wheel holds code the device can run. Returns ``{'ok', 'elements',
    'max_abs_error'}``; raises RuntimeError with the CUDA error (for example "no kernel image is
    available") when it cannot run.
    """
    return dict(_C.cuda_selftest(int(device), int(elements)))


def cpu_selftest(elements: int = 1 << 22) -> dict:
    """Checks the CPU thread pool against a closed form; returns ``{'ok', 'threads', 'elements'}``."""
    return dict(_C.cpu_selftest(int(elements)))
