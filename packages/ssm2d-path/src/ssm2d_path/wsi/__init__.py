"""Whole-slide images: reading slides (OpenSlide), tissue detection, patch grids, feature extraction,
heatmaps. See :mod:`.slide` for the reader every stage shares."""

from __future__ import annotations

from .coords import PatchGrid, grid_folder, patches_path, read_coords, write_coords
from .slide import MissingMPPError, Slide, SlideReadError, magnification_of_mpp, open_slide

__all__ = ["PatchGrid", "grid_folder", "patches_path", "read_coords", "write_coords", "MissingMPPError", "Slide", "SlideReadError", "magnification_of_mpp", "open_slide"]
