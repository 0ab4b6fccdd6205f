"""Which implementation of an op runs: the compiled kernels or the pure-PyTorch reference.

Every op takes ``backend="auto" | "kernel" | "reference"``:

* ``"kernel"``: ssm2d-kernels for the tensors' device; raises BackendUnavailableError, saying why,
  when it cannot run there (never a silent fallback).
* ``"reference"``: the pure-PyTorch implementation (the test oracle; slow, memory-hungry).
* ``"auto"``: the kernel when it can run, else the reference; logs once per (op, device type)
  which one it uses, as a warning when it falls back to the slow reference.
"""

from __future__ import annotations

import logging

import torch

from . import _kernels

BACKENDS = ("auto", "kernel", "reference")
logger = logging.getLogger("ssm2d_nn")
_announced: set[tuple] = set()


class BackendUnavailableError(RuntimeError):
    """backend='kernel' was asked for but the compiled kernel cannot run on this device."""


def kernel_unavailable_reason(device: torch.device) -> str | None:
    """None when ssm2d-kernels can run on ``device``, else a sentence saying why not (cached: the
    installation and the devices do not change while the process runs)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (device.type, device.index)
    if key not in _reasons:
        _reasons[key] = _unavailable_reason(device)
    return _reasons[key]


_reasons: dict[tuple, str | None] = {}


def _unavailable_reason(device: torch.device) -> str | None:
    status = _kernels.STATUS
    if not status.available:
        return f"{status.problem} (fix: {status.hint})"
    import ssm2d_kernels

    if device.type in ("cpu", "meta"):
        return None  # on "meta" the ops' fake (shape-only) implementations run: no data, no cost
    if device.type == "cuda":
        info = ssm2d_kernels.build_info()
        if not info["cuda"]:
            return (
                f"the installed ssm2d-kernels {info['version']} was built without CUDA; "
                "install a CUDA build of ssm2d-kernels"
            )
        index = device.index
        count = ssm2d_kernels.cuda_device_count()
        if index >= count:
            return f"ssm2d-kernels sees {count} CUDA device(s), so cuda:{index} is out of reach"
        return None
    return f"ssm2d-kernels has no kernels for device type '{device.type}'"


def check_backend_name(op: str, backend: str) -> None:
    """Raises ValueError unless ``backend`` is one of BACKENDS (the message names ``op``)."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")


def resolve_backend(op: str, backend: str, device: torch.device, unsupported: str | None = None) -> str:
    """Returns "kernel" or "reference" for running ``op`` on ``device``.

    ``unsupported``: a reason the kernel cannot take this particular call (e.g. its dtype), or None.
    Raises ValueError for an unknown ``backend`` name and BackendUnavailableError for
    ``backend="kernel"`` where the kernel cannot run. Under torch.compile the decision is made once
    at trace time and baked into the graph (it depends only on the installation and the device).
    """
    return _resolve(op, backend, device.type, -1 if device.index is None else device.index, unsupported)


@torch.compiler.assume_constant_result
def _resolve(op: str, backend: str, device_type: str, index: int, unsupported: str | None) -> str:
    device = torch.device(device_type) if index < 0 else torch.device(device_type, index)
    check_backend_name(op, backend)
    if backend == "reference":
        return "reference"
    reason = unsupported or kernel_unavailable_reason(device)
    if backend == "kernel":
        if reason is not None:
            raise BackendUnavailableError(f"{op}: backend='kernel' cannot run on {device}: {reason}")
        return "kernel"
    chosen = "kernel" if reason is None else "reference"
    key = (op, device.type, chosen, reason)
    if key not in _announced:
        _announced.add(key)
        if chosen == "kernel":
            logger.info("%s on %s: backend='auto' uses the ssm2d-kernels kernel", op, device.type)
        else:
            logger.warning(
                "%s on %s: backend='auto' uses the pure-PyTorch reference (slow) because %s",
                op, device.type, reason,
            )
    return chosen


def resolve_fused(op: str, backend: str, device_type: str, refusal, fallback: str) -> str:
    """"kernel" or "reference" for a fused helper op (layer_norm, star_relu) whose "reference" is
    PyTorch's own implementation, not a slow one. ``refusal()`` says why the kernel cannot take the
    call (None: it can); asked only when the kernel is wanted. ``backend="kernel"`` raises
    BackendUnavailableError with that reason; "auto" logs its choice once per (op, device type,
    reason) at INFO level, naming ``fallback`` when PyTorch's implementation runs."""
    check_backend_name(op, backend)
    if backend == "reference":
        return "reference"
    reason = refusal()
    if backend == "kernel" and reason is not None:
        raise BackendUnavailableError(f"{op}: backend='kernel' cannot run this call: {reason}")
    chosen = "kernel" if reason is None else "reference"
    key = (op, device_type, chosen, reason)
    if key not in _announced:
        _announced.add(key)
        logger.info("%s on %s: backend=%r runs %s%s", op, device_type, backend,
                    "the ssm2d-kernels kernel" if reason is None else fallback, "" if reason is None else f" ({reason})")
    return chosen
