"""Where the shipped mmseg configs are."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["CONFIGS", "config_path"]

# Short name (the backbone's timm name) -> config file under ssm2d_vision/mmseg/configs/.
CONFIGS = {
    name: f"upernet_{name}_ade20k_160k_512x512.py"
    for name in ["vmamba_tiny", "vmamba_small", "vmamba_base", "vmamba2d_tiny", "vmamba2d_small",
                 "m2d_nano", "m2d_tiny", "m2d_small"]
}


def config_path(name: str) -> Path:
    """Path of a shipped config, by backbone name (``"m2d_tiny"``) or file name
    (``"upernet_m2d_tiny_ade20k_160k_512x512.py"``), for ``mmengine.Config.fromfile`` or mmseg's
    ``tools/train.py``."""
    file = CONFIGS.get(name, name)
    path = Path(str(resources.files("ssm2d_vision.mmseg").joinpath("configs", file)))
    if file not in CONFIGS.values() or not path.is_file():
        raise ValueError(f"name: no shipped config {name!r}; available: {sorted(CONFIGS)}")
    return path
