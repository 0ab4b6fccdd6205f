"""Array descriptors at the boundary: pointer, shape, strides (elements), dtype, device.

Accepted: torch tensors (duck-typed, torch is never imported), objects exposing
``__cuda_array_interface__`` (CuPy, Numba, ...) or ``__array_interface__`` (NumPy), and
``Array`` tuples built by hand.
"""

from __future__ import annotations

from typing import NamedTuple

# Codes shared with csrc/include/ssm2d/ops.h (enum class DType).
DTYPES = {"float32": 0, "float16": 1, "bfloat16": 2, "float64": 3}
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
_TYPESTR = {"<f4": "float32", "<f2": "float16", "<f8": "float64"}


class Array(NamedTuple):
    ptr: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]  # in elements
    dtype: str  # a key of DTYPES
    device: int  # -1: host memory, else the CUDA device ordinal
    readonly: bool = False  # an input may be; an output may not


def _check_pointer(ptr: int, shape: tuple, name: str) -> None:
    """A null pointer with elements to read would crash the kernel: refuse it here."""
    n = 1
    for s in shape:
        n *= int(s)
    if ptr == 0 and n > 0:
        raise ValueError(f"{name} has {n} elements but a null data pointer")


def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= s
    return tuple(reversed(strides))


def as_array(obj, name: str) -> Array:
    """Describes ``obj``; raises TypeError naming ``name`` when it is not an array of a supported dtype."""
    if isinstance(obj, Array):
        return obj
    if hasattr(obj, "data_ptr") and hasattr(obj, "stride") and hasattr(obj, "device"):  # torch.Tensor
        dtype = str(obj.dtype).removeprefix("torch.")
        if dtype not in DTYPES:
            raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {obj.dtype}")
        dev = obj.device
        if dev.type == "cpu":
            index = -1
        elif dev.type == "cuda":
            index = dev.index if dev.index is not None else 0
        else:
            raise TypeError(f"{name} is on device '{dev}'; ssm2d-kernels runs on 'cpu' and 'cuda' tensors")
        shape = tuple(obj.shape)
        ptr = int(obj.data_ptr())
        _check_pointer(ptr, shape, name)
        return Array(ptr, shape, tuple(obj.stride()), dtype, index)
    for attr, device in (("__cuda_array_interface__", None), ("__array_interface__", -1)):
        iface = getattr(obj, attr, None)
        if iface is None:
            continue
        dtype = _TYPESTR.get(iface["typestr"])
        if dtype is None:
            raise TypeError(f"{name} must be float32, float16 or float64, got typestr {iface['typestr']!r}")
        shape = tuple(iface["shape"])
        if iface.get("strides") is None:
            strides = _contiguous_strides(shape)
        else:
            size = ITEMSIZE[dtype]
            if any(s % size for s in iface["strides"]):
                raise ValueError(f"{name} has strides {iface['strides']} that are not multiples of its item size")
            strides = tuple(s // size for s in iface["strides"])
        if device is None:
            device = _cuda_pointer_device(iface["data"][0], name)
        ptr, readonly = int(iface["data"][0]), bool(iface["data"][1])
        _check_pointer(ptr, shape, name)
        return Array(ptr, shape, strides, dtype, device, readonly)
    raise TypeError(
        f"{name} must be an array (torch tensor, or an object with __cuda_array_interface__ or "
        f"__array_interface__), got {type(obj).__name__}"
    )


def _cuda_pointer_device(ptr: int, name: str) -> int:
    from . import _C

    if ptr == 0:
        return 0
    return int(_C.cuda_pointer_device(ptr))


def device_name(index: int) -> str:
    return "cpu" if index < 0 else f"cuda:{index}"


def check_writable(a: Array, name: str) -> None:
    if a.readonly:
        raise ValueError(f"{name} is read-only: the kernel writes it (pass a writable array)")


def check_buffer(a: Array, name: str, shape: tuple, dtype: str, device: int) -> None:
    """A caller-provided output or scratch array: exact shape, dtype and device, writable, else a clear
    error."""
    check_writable(a, name)
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(a.shape)}")
    if a.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {a.dtype}")
    if a.device != device:
        raise ValueError(f"{name} is on device {device_name(a.device)}, expected {device_name(device)}")
