"""``manifest.json``: what a run used, written next to its results.

The resolved config, package versions, Python and platform, the device, seeds, the scan backend the model
used, and the input files: label table and split files with size and sha256; feature files with size and
mtime (sha256 too when smaller than ``hash_limit``). No version-control state is read.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata as md
import json
import os
import platform
import sys
from pathlib import Path
from typing import Iterable, Mapping, Optional
from ssm2d_nn.fileio import atomic_output

__all__ = ["file_record", "package_versions", "write_json_atomic", "write_manifest", "now"]

PACKAGES = ("ssm2d-kernels", "ssm2d-nn", "ssm2d-vision", "ssm2d-path", "torch", "numpy", "h5py", "lifelines",
            "pandas", "pyyaml")


def now() -> str:
    """Local time with offset, ISO 8601, seconds."""
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def sha256(path: os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def file_record(path: os.PathLike, *, hash: bool = False, hash_limit: int = 1 << 20) -> dict:
    """{path, size, mtime (ISO), sha256 (when ``hash`` or size <= hash_limit)}; a missing file gets
    ``"missing": true``."""
    p = Path(path)
    rec = {"path": str(p)}
    try:
        st = p.stat()
    except OSError:
        rec["missing"] = True
        return rec
    rec["size"] = st.st_size
    rec["mtime"] = _dt.datetime.fromtimestamp(st.st_mtime).astimezone().isoformat(timespec="seconds")
    if hash or st.st_size <= hash_limit:
        rec["sha256"] = sha256(p)
    return rec


def package_versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def device_record(device) -> dict:
    import torch

    dev = torch.device(device)
    rec = {"device": str(dev), "torch_threads": torch.get_num_threads()}
    if dev.type == "cuda" and torch.cuda.is_available():
        i = dev.index if dev.index is not None else torch.cuda.current_device()
        rec.update(name=torch.cuda.get_device_name(i), capability=".".join(map(str, torch.cuda.get_device_capability(i))),
                   cuda=torch.version.cuda)
    else:
        rec["name"] = platform.processor() or platform.machine()
    return rec


def write_json_atomic(path: os.PathLike, obj) -> Path:
    """JSON with indent 2 to a temp file in the same folder, then os.replace (NaN written as NaN)."""
    path = Path(path)
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")
    return path


def write_manifest(out_dir: os.PathLike, *, config: Mapping, device=None, seeds: Optional[Mapping] = None,
                   scan_backend: Optional[str] = None, label_files: Iterable[os.PathLike] = (),
                   split_files: Iterable[os.PathLike] = (), feature_files: Iterable[os.PathLike] = (),
                   start: Optional[str] = None, end: Optional[str] = None, extra: Optional[Mapping] = None,
                   hash_limit: int = 1 << 20) -> Path:
    """Write ``out_dir/manifest.json`` and return its path.

    Args:
        config: the resolved config (``Config.to_dict()``).
        device: torch device the run used.  seeds: e.g. {"train": 0, "splits": 0}.
        scan_backend: ``model.scan_backend`` after the run (None for models without a scan).
        label_files, split_files: hashed in full.  feature_files: size + mtime (+ sha256 when small).
    """
    manifest = {
        "config": dict(config),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": device_record(device) if device is not None else None,
        "seeds": dict(seeds or {}),
        "scan_backend": scan_backend,
        "inputs": {
            "labels": [file_record(p, hash=True) for p in label_files],
            "splits": [file_record(p, hash=True) for p in split_files],
            "features": [file_record(p, hash_limit=hash_limit) for p in feature_files],
        },
        "start": start,
        "end": end or now(),
    }
    if extra:
        manifest.update(extra)
    return write_json_atomic(Path(out_dir) / "manifest.json", manifest)
