"""Reading and writing the patch-feature files of CLAM, TRIDENT and STAMP (see :mod:`.readers`)."""

from __future__ import annotations

from .errors import EmptySlideError, SlideFileError
from .readers import FORMATS, detect_format, is_patches_file, read_slide, slide_id_of
from .stride import infer_spacing, infer_stride
from .trident import convert_slide, trident_folder, write_trident

__all__ = [
    "EmptySlideError",
    "FORMATS",
    "SlideFileError",
    "convert_slide",
    "detect_format",
    "infer_spacing",
    "infer_stride",
    "is_patches_file",
    "read_slide",
    "slide_id_of",
    "trident_folder",
    "write_trident",
]
