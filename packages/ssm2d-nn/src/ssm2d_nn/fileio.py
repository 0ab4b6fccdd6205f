"""Writing files so that an interrupted write never leaves a file that looks complete, and reading
weight files without running code from them.

Shared by ssm2d-vision (converted checkpoints) and ssm2d-path (features, checkpoints, splits,
results, manifests): every file is written under a temporary name in the destination folder and
renamed over the destination (``os.replace``, atomic on POSIX and Windows) only once it is complete.
The file gets the permissions a plain ``open(path, "w")`` would give it (``0o666`` less the umask),
not the private ``0o600`` of a temporary file.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Iterator, Union

__all__ = ["atomic_output", "default_file_mode", "load_weights"]

_UMASK_LOCK = threading.Lock()


def default_file_mode() -> int:
    """``0o666`` less the process umask: the mode ``open(path, "w")`` gives a new file."""
    try:  # Linux: read it without changing it
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # elsewhere reading the umask means setting it; keep other threads of this module out
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_output(path: Union[str, os.PathLike]) -> Iterator[Path]:
    """Yields a temporary path next to ``path`` to write to; on a clean exit it replaces ``path``,
    on an exception it is removed and ``path`` is left as it was. Creates the parent folder. The
    file ends up with the umask's permissions (as ``open()`` would create it).

        with atomic_output("model.pt") as tmp:
            torch.save(state, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        if os.name == "posix":
            # mkstemp makes the file 0o600 (private); writers that recreate it keep whatever they got.
            os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _first_line(text: str) -> str:
    for line in str(text).splitlines():
        if line.strip():
            return line.strip()
    return ""


def load_weights(path: Union[str, os.PathLike], map_location="cpu", *, what: str = "checkpoint", mmap: bool = False):
    """``torch.load(path, weights_only=True)``, with errors that say what is wrong with the file.

    Only tensors and plain containers are ever loaded (never pickled code). A file that holds other
    objects is refused; the message says so and never suggests loading it without ``weights_only``.

    Raises:
        FileNotFoundError when ``path`` is not a file; ValueError naming ``what`` and the file when it
        is empty, truncated, not a ``torch.save`` file, or holds objects other than weights.
    """
    import pickle

    import torch

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} {str(p)!r} does not exist" + (" (it is a folder)" if p.is_dir() else ""))
    if p.stat().st_size == 0:
        raise ValueError(f"{what} {str(p)!r} is empty (0 bytes): an interrupted copy or download?")
    try:
        return torch.load(p, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - torch raises many types for foreign or damaged files
        raw = str(e)
        text = _without_advice(raw)
        found = re.search(r"GLOBAL ([\w.]+)", raw)
        if found:
            reason = (f"holds a Python object ({found.group(1)}) besides tensors and plain containers; "
                      f"only weights are read from files, never code: save a state dict instead "
                      f"(torch.save(model.state_dict(), path))")
        elif isinstance(e, pickle.UnpicklingError) or "Weights only load failed" in str(e):
            m = re.search(r"WeightsUnpickler error:\s*([^\n]*)", raw)
            detail = re.split(r"\.\s+Please|\s+Please use", m.group(1))[0].strip() if m else _first_line(text)
            if re.search(r"Unsupported operand|invalid load key|pickle data was truncated", text):
                reason = f"is not a torch.save file (truncated, or another format): {detail}"
            else:
                reason = f"holds data that is not plain weights (tensors, numbers, strings, lists, dicts): {detail}"
        elif isinstance(e, EOFError):
            reason = "ends early (truncated)"
        elif "zip archive" in text or "PytorchStreamReader" in text or "central directory" in text:
            reason = f"is not a complete torch.save file (truncated, or another format): {_first_line(text)}"
        else:
            reason = f"cannot be read as a torch.save file ({type(e).__name__}: {_first_line(text)})"
        raise ValueError(f"{what} {str(p)!r} {reason.rstrip(': ')}") from None


def _without_advice(text: str) -> str:
    """torch.load's message without its paragraphs of advice (loading with weights_only=False, filing
    an issue, the documentation link): only what is wrong with the file."""
    keep = [para for para in re.split(r"\n\s*\n", text)
            if para.strip() and not re.search(r"weights_only|Re-running|file an issue|Check the documentation", para)]
    return "\n\n".join(keep)
