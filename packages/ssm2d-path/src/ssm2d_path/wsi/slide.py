"""Reading whole-slide images through OpenSlide: geometry, micrometres per pixel, patches, thumbnails.

A :class:`Slide` knows its level-0 size, pyramid levels, mpp (micrometres per level-0 pixel) and
objective magnification, and reads a level-0 square as a patch of a requested size from the
pyramid level closest above the needed resolution (never an upsampled coarser level). Regions
outside the scanned area (transparent in OpenSlide) come back white, the colour of glass.

Slides are opened lazily and the open handle is not pickled, so a :class:`Slide` can be handed to
DataLoader worker processes: each worker opens its own handle on first use.
"""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..io.errors import SlideFileError

__all__ = ["MissingMPPError", "Slide", "SlideReadError", "magnification_of_mpp", "open_slide"]

PathLike = Union[str, os.PathLike]

# The convention of the field (Aperio, TRIDENT, CLAM): 40x is ~0.25 um/px, 20x ~0.5 um/px.
MPP_AT_10X = 1.0


class SlideReadError(SlideFileError):
    """OpenSlide cannot open or read the slide file (missing, unsupported format, corrupt tiles)."""


class MissingMPPError(SlideFileError):
    """The slide records no micrometres per pixel and none was given (``mpp=`` / the config's ``slides.mpp``)."""


def magnification_of_mpp(mpp: float) -> float:
    """The objective magnification conventionally matching ``mpp``: 10 / mpp (0.25 -> 40x, 0.5 -> 20x)."""
    return 10.0 * MPP_AT_10X / float(mpp)


def _positive_float(text) -> Optional[float]:
    try:
        v = float(text)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


class Slide:
    """A whole-slide image file read through OpenSlide.

    Args:
        path: the slide file (any format OpenSlide reads: .svs, .ndpi, .mrxs, .tiff, ...).
        mpp: micrometres per level-0 pixel to use instead of (or when missing from) the file.
        magnification: level-0 objective power to use instead of the file's (default: the file's
            ``openslide.objective-power``, else ``10 / mpp``).
    Raises:
        SlideReadError naming the file when OpenSlide cannot open it (raised on construction).
    """

    def __init__(self, path: PathLike, *, mpp: Optional[float] = None, magnification: Optional[float] = None):
        self.path = Path(path)
        self.name = self.path.stem
        if mpp is not None and _positive_float(mpp) is None:
            raise ValueError(f"mpp: expected a positive number of micrometres per pixel, got {mpp!r}")
        if magnification is not None and _positive_float(magnification) is None:
            raise ValueError(f"magnification: expected a positive objective power, got {magnification!r}")
        self._mpp_arg = None if mpp is None else float(mpp)
        self._mag_arg = None if magnification is None else float(magnification)
        self._handle = None
        self._pid = None
        self._lock = threading.Lock()
        osr = self._open()
        self.dimensions: tuple[int, int] = tuple(int(v) for v in osr.dimensions)
        self.level_count: int = int(osr.level_count)
        self.level_dimensions: list[tuple[int, int]] = [tuple(int(v) for v in d) for d in osr.level_dimensions]
        self.level_downsamples: list[float] = [float(d) for d in osr.level_downsamples]
        self.properties: dict[str, str] = dict(osr.properties)

    # -- the OpenSlide handle (one per process) --------------------------------------------------
    def _open(self):
        import openslide

        if self._handle is not None and self._pid == os.getpid():
            return self._handle
        with self._lock:
            if self._handle is not None and self._pid == os.getpid():
                return self._handle
            if not self.path.is_file():
                raise SlideReadError(f"{self.path}: slide file does not exist")
            try:
                self._handle = openslide.OpenSlide(str(self.path))
            except (openslide.OpenSlideError, OSError, ValueError) as e:
                raise SlideReadError(f"{self.path}: OpenSlide cannot read this slide ({type(e).__name__}: {e})") from None
            self._pid = os.getpid()
            return self._handle

    def close(self) -> None:
        if self._handle is not None and self._pid == os.getpid():
            self._handle.close()
        self._handle = None

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handle"], state["_pid"], state["_lock"] = None, None, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        mpp = self.mpp_or_none
        return (f"Slide({self.name!r}, {self.dimensions[0]}x{self.dimensions[1]}, levels={self.level_count}, "
                f"mpp={mpp if mpp is None else round(mpp, 4)})")

    # -- geometry --------------------------------------------------------------------------------
    @property
    def mpp_or_none(self) -> Optional[float]:
        """Level-0 micrometres per pixel (the argument, else the mean of the file's x/y), or None."""
        if self._mpp_arg is not None:
            return self._mpp_arg
        mx = _positive_float(self.properties.get("openslide.mpp-x"))
        my = _positive_float(self.properties.get("openslide.mpp-y"))
        if mx and my:
            return 0.5 * (mx + my)
        return mx or my

    @property
    def mpp(self) -> float:
        """Level-0 micrometres per pixel. Raises MissingMPPError when neither the file nor ``mpp=`` gives it."""
        v = self.mpp_or_none
        if v is None:
            raise MissingMPPError(f"{self.path}: the slide records no microns per pixel (openslide.mpp-x/y); "
                                  "give it explicitly (slides.mpp in the config, or --mpp)")
        return v

    @property
    def mpp_source(self) -> str:
        """Where :attr:`mpp` comes from: "argument", "file" or "missing"."""
        if self._mpp_arg is not None:
            return "argument"
        return "file" if self.mpp_or_none is not None else "missing"

    @property
    def magnification(self) -> float:
        """Level-0 objective power: the argument, the file's objective power, else ``10 / mpp``."""
        if self._mag_arg is not None:
            return self._mag_arg
        v = _positive_float(self.properties.get("openslide.objective-power"))
        return v if v is not None else magnification_of_mpp(self.mpp)

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample is <= ``downsample`` (never a level coarser than asked)."""
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= downsample * (1 + 1e-6):
                best = i
        return best

    # -- pixels ----------------------------------------------------------------------------------
    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 (h, w, 3) of ``size`` = (w, h) pixels of ``level``, top-left at level-0 ``location``
        (x, y); transparent (unscanned) pixels are white. Raises SlideReadError naming the file."""
        import openslide

        if not 0 <= level < self.level_count:
            raise ValueError(f"level: expected 0..{self.level_count - 1}, got {level}")
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            raise ValueError(f"size: expected positive (w, h), got {size}")
        try:
            rgba = np.asarray(self._open().read_region((int(location[0]), int(location[1])), level, (w, h)))
        except openslide.OpenSlideError as e:
            raise SlideReadError(f"{self.path}: reading {w}x{h} px at level {level}, {location} failed: {e}") from None
        return _rgba_on_white(rgba)

    def read_patch(self, x: int, y: int, size_level0: int, out_size: int) -> np.ndarray:
        """The level-0 square [x, x + size_level0) x [y, y + size_level0) as an RGB uint8
        (out_size, out_size, 3) patch, read from the finest-needed pyramid level and resized
        (area-averaging Lanczos) only when that level's pixels are not already ``out_size``."""
        from PIL import Image

        if size_level0 <= 0 or out_size <= 0:
            raise ValueError(f"size_level0 ({size_level0}) and out_size ({out_size}) must be positive")
        level = self.best_level_for_downsample(size_level0 / out_size)
        ds = self.level_downsamples[level]
        n = max(1, int(round(size_level0 / ds)))
        img = self.read_region((x, y), level, (n, n))
        if n != out_size:
            img = np.asarray(Image.fromarray(img).resize((out_size, out_size), Image.Resampling.LANCZOS))
        return img

    def thumbnail(self, downsample: Optional[float] = None, *, max_side: int = 2048) -> tuple[np.ndarray, float]:
        """An RGB uint8 picture of the whole slide at level-0 ``downsample`` (default: the smallest
        downsample whose longer side fits ``max_side``). Returns (image (h, w, 3), downsample) with
        ``h = round(H0 / downsample)``, ``w = round(W0 / downsample)``: level-0 (x, y) maps to pixel
        (x / downsample, y / downsample). Memory: the chosen pyramid level's pixels are read whole."""
        from PIL import Image

        W0, H0 = self.dimensions
        if downsample is None:
            downsample = max(1.0, max(W0, H0) / float(max_side))
        if not downsample > 0:
            raise ValueError(f"downsample: expected a positive number, got {downsample!r}")
        w, h = max(1, int(round(W0 / downsample))), max(1, int(round(H0 / downsample)))
        level = self.best_level_for_downsample(downsample)
        lw, lh = self.level_dimensions[level]
        img = self.read_region((0, 0), level, (lw, lh))
        if (lw, lh) != (w, h):
            img = np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.LANCZOS))
        return img, float(downsample)


def _rgba_on_white(rgba: np.ndarray) -> np.ndarray:
    """OpenSlide returns premultiplied-alpha RGBA whose unscanned pixels are (0, 0, 0, 0): composite
    onto white so that background reads as glass, not black (black would look like tissue)."""
    rgb = rgba[..., :3].astype(np.uint16)
    a = rgba[..., 3:4].astype(np.uint16)
    if bool((a == 255).all()):
        return np.ascontiguousarray(rgba[..., :3])
    # premultiplied: out = rgb + (255 - a) * white / 255
    out = rgb + (255 - a)
    return np.clip(out, 0, 255).astype(np.uint8)


def open_slide(path: PathLike, *, mpp: Optional[float] = None, magnification: Optional[float] = None) -> Slide:
    """Open a slide (see :class:`Slide`); raises SlideReadError naming the file when it cannot be read."""
    return Slide(path, mpp=mpp, magnification=magnification)
