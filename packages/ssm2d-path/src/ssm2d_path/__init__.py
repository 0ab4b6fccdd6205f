"""ssm2d-path: whole-slide-image multiple-instance learning with 2D state-space models.

From the feature files pathology users already have (CLAM, TRIDENT, STAMP) to cross-validated
2DMambaMIL and baselines, survival analysis, heatmaps; one config file and the ``ssm2d-path``
command.
"""

from __future__ import annotations

from .__about__ import __version__

__all__ = ["__version__"]
