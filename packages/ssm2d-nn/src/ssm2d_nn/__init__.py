"""ssm2d-nn: PyTorch ops and layers for 2D selective state-space models.

Ops (functional, registered as torch.library custom ops) live in ``ssm2d_nn.ops``; modules in
``ssm2d_nn.layers``. Each op runs on the compiled ssm2d-kernels or on its pure-PyTorch reference,
chosen per call (see ``ssm2d_nn.backends``). Importing this package checks that the installed
ssm2d-kernels is compatible and, if not, warns with the exact command that fixes it.
"""

from __future__ import annotations

from . import _kernels
from .__about__ import __version__
from ._kernels import KERNELS_REQUIREMENT, KernelsUnavailableWarning
from .backends import BACKENDS, BackendUnavailableError, resolve_backend

__all__ = [
    "BACKENDS",
    "KERNELS_REQUIREMENT",
    "BackendUnavailableError",
    "KernelsUnavailableWarning",
    "__version__",
    "kernels_status",
    "resolve_backend",
]


def kernels_status() -> _kernels.KernelsStatus:
    """Whether a compatible ssm2d-kernels is installed: available, version, problem, fix command."""
    return _kernels.STATUS
