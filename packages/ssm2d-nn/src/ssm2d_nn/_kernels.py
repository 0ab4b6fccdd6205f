"""Is a compatible ssm2d-kernels installed? Checked once, at import of ssm2d_nn.

ssm2d_nn works without the compiled wheel (the "reference" backend is pure PyTorch), so a missing
or incompatible wheel is a warning that says exactly what to install, not an ImportError.
"""

from __future__ import annotations

import dataclasses
import warnings

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

# The range of ssm2d-kernels this ssm2d-nn was written against. pyproject.toml declares the same
# range as a dependency; tests/test_packages.py checks that the two agree.
KERNELS_REQUIREMENT = ">=0.1.0,<0.2"


class KernelsUnavailableWarning(UserWarning):
    """ssm2d-kernels is missing or outside the supported range; only the reference backend works."""


@dataclasses.dataclass(frozen=True)
class KernelsStatus:
    available: bool
    version: str | None
    problem: str | None  # why it is unusable, None when available
    hint: str | None  # the command that fixes it, None when available


def install_hint(installed: str | None) -> str:
    spec = f"'ssm2d-kernels{KERNELS_REQUIREMENT}'"
    return f"pip install {spec}" if installed is None else f"pip install --upgrade {spec}"


def check_kernels_version(version: str | None) -> KernelsStatus:
    """Decides compatibility of an installed ssm2d-kernels version (None: not installed)."""
    if version is None:
        return KernelsStatus(False, None, "ssm2d-kernels is not installed", install_hint(None))
    try:
        ok = Version(version) in SpecifierSet(KERNELS_REQUIREMENT, prereleases=True)
    except InvalidVersion:
        ok = False
    if ok:
        return KernelsStatus(True, version, None, None)
    return KernelsStatus(
        False,
        version,
        f"ssm2d-kernels {version} is installed but ssm2d-nn needs ssm2d-kernels{KERNELS_REQUIREMENT}",
        install_hint(version),
    )


def _probe() -> KernelsStatus:
    try:
        import ssm2d_kernels
    except ImportError as exc:
        status = check_kernels_version(None)
        if "ssm2d_kernels" in str(exc) and "No module named" not in str(exc):
            # Installed but broken (e.g. a stale compiled module): keep its own message.
            status = dataclasses.replace(status, problem=f"ssm2d-kernels failed to import: {exc}")
        return status
    return check_kernels_version(getattr(ssm2d_kernels, "__version__", None))


STATUS: KernelsStatus = _probe()

if not STATUS.available:
    warnings.warn(
        f"{STATUS.problem}. The fast CPU/CUDA kernels are unavailable and only backend='reference' "
        f"(pure PyTorch, slower) works. To fix: {STATUS.hint}",
        KernelsUnavailableWarning,
        stacklevel=2,
    )
