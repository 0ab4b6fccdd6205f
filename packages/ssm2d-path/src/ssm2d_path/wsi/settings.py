"""Config sections of the slide pipeline (``slides``, ``patch``, ``extract``, ``heatmap``).

They live in the run's YAML next to ``data``/``model``/``train``/``output`` and are validated by
:func:`ssm2d_path.config.parse_config` like every other section (unknown keys fail with their path).
Every stage writes under ``slides.job_dir`` in TRIDENT's layout::

    <job_dir>/<mag>x_<px>px_<ov>px_overlap/patches/<slide>_patches.h5     coords + geometry (patch)
    <job_dir>/<mag>x_<px>px_<ov>px_overlap/visualization/<slide>.png      thumbnail, tissue, grid (patch)
    <job_dir>/<mag>x_<px>px_<ov>px_overlap/features_<encoder>/<slide>.h5  features (extract)
    <job_dir>/heatmaps/<slide>/...                                        heatmap (heatmap)

Example::

    slides: {dir: slides/, job_dir: wsi_job/}
    patch: {target_magnification: 20, patch_size: 256, overlap: 0}
    extract: {encoder: resnet50, weights: weights/encoder.safetensors, batch_size: 128}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

__all__ = ["ExtractConfig", "HeatmapConfig", "PatchConfig", "SLIDE_EXTENSIONS", "SlidesConfig"]

# What OpenSlide reads (plus generic tiled TIFF); the default of ``slides.extensions``.
SLIDE_EXTENSIONS = ("svs", "tif", "tiff", "ndpi", "vms", "vmu", "scn", "mrxs", "svslide", "bif", "dcm")


@dataclass
class SlidesConfig:
    """Which slides, where the outputs go, and the mpp to assume for slides that record none."""

    dir: Optional[str] = None  # a folder of slides (searched by extension) or one slide file
    job_dir: str = "wsi_job"
    extensions: list = field(default_factory=lambda: list(SLIDE_EXTENSIONS))
    mpp: Optional[float] = None  # level-0 um/px for slides without one (else they fail with MissingMPPError)
    recursive: bool = False

    def check(self) -> None:
        """Raise ValueError("<key>: what is wrong") for a value out of range."""
        if self.mpp is not None and not self.mpp > 0:
            raise ValueError(f"mpp: must be > 0 micrometres per pixel, got {self.mpp}")
        if not all(isinstance(e, str) and e for e in self.extensions):
            raise ValueError(f"extensions: expected a list of file extensions, got {self.extensions!r}")


@dataclass
class PatchConfig:
    """Tissue detection and the patch grid. Give ``target_magnification`` or ``target_mpp``."""

    target_magnification: Optional[float] = 20.0
    target_mpp: Optional[float] = None  # wins over target_magnification when set
    patch_size: int = 256  # px at the target resolution
    overlap: int = 0  # px at the target resolution (stride = patch_size - overlap)
    min_tissue: float = 0.25  # fraction of a patch's area that must be tissue to keep it
    tissue_mpp: float = 8.0  # resolution (um/px) of the picture tissue is detected on
    threshold: Optional[float] = None  # saturation threshold 0..255; None = Otsu per slide
    min_saturation: float = 15.0  # floor of the threshold (a blank slide's Otsu is noise)
    dark_value: float = 40.0  # pixels darker than this (HSV value 0..255: pen, scanner borders) are not tissue
    median_um: float = 56.0  # median-filter width before thresholding
    close_um: float = 32.0  # morphological closing radius (joins nearby tissue)
    open_um: float = 16.0  # morphological opening radius (removes thin debris)
    min_fragment_um2: float = 50000.0  # tissue fragments smaller than this are removed
    min_hole_um2: float = 20000.0  # holes smaller than this are filled
    thumbnail_max_side: int = 2048  # visualization PNG size

    def check(self) -> None:
        """Raise ValueError("<key>: what is wrong") for a value out of range."""
        if self.patch_size <= 0:
            raise ValueError(f"patch_size: must be > 0, got {self.patch_size}")
        if not 0 <= self.overlap < self.patch_size:
            raise ValueError(f"overlap: expected 0 <= overlap < patch_size ({self.patch_size}), got {self.overlap}")
        if self.target_mpp is None and self.target_magnification is None:
            raise ValueError("target_magnification: give target_magnification or target_mpp")
        for key in ("target_mpp", "target_magnification"):
            v = getattr(self, key)
            if v is not None and not v > 0:
                raise ValueError(f"{key}: must be > 0, got {v}")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ValueError(f"min_tissue: must be in [0, 1], got {self.min_tissue}")
        if not self.tissue_mpp > 0:
            raise ValueError(f"tissue_mpp: must be > 0 micrometres per pixel, got {self.tissue_mpp}")
        if self.threshold is not None and not 0 <= self.threshold <= 255:
            raise ValueError(f"threshold: expected a saturation in [0, 255] or null (Otsu), got {self.threshold}")
        for key in ("min_saturation", "dark_value", "median_um", "close_um", "open_um", "min_fragment_um2",
                    "min_hole_um2"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}: must be >= 0, got {getattr(self, key)}")
        if self.thumbnail_max_side < 16:
            raise ValueError(f"thumbnail_max_side: must be >= 16 px, got {self.thumbnail_max_side}")


@dataclass
class ExtractConfig:
    """The patch encoder (any timm model) and how patches are fed to it."""

    encoder: str = "resnet50"  # timm model name
    weights: Optional[str] = None  # local weights file (.pth/.pt/.bin/.safetensors); None = random init
    encoder_kwargs: dict = field(default_factory=dict)  # extra timm.create_model arguments
    name: Optional[str] = None  # encoder name in the output folder features_<name> (default: encoder)
    batch_size: int = 64
    num_workers: int = 4  # patch-reading worker processes per rank
    device: str = "auto"
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    overwrite: bool = False

    def check(self) -> None:
        """Raise ValueError("<key>: what is wrong") for a value out of range."""
        if self.batch_size <= 0:
            raise ValueError(f"batch_size: must be > 0, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers: must be >= 0, got {self.num_workers}")


@dataclass
class HeatmapConfig:
    """Per-patch scores of a trained model drawn over the slide."""

    checkpoint: Optional[str] = None  # model.pt of a run (model.json next to it describes the model)
    method: Literal["auto", "attention", "gradient", "both"] = "auto"  # auto: attention (+ gradient for 2D models)
    target: Optional[int] = None  # class for classification (default: the predicted one); survival: risk
    alpha: float = 0.5  # overlay opacity
    cmap: str = "jet"
    downsample: Optional[float] = None  # thumbnail downsample (default: fits thumbnail_max_side)
    thumbnail_max_side: int = 2048
    top_k: int = 8  # highest-scoring patches exported as PNG
    device: str = "auto"

    def check(self) -> None:
        """Raise ValueError("<key>: what is wrong") for a value out of range."""
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha: must be in [0, 1], got {self.alpha}")
        if self.top_k < 0:
            raise ValueError(f"top_k: must be >= 0, got {self.top_k}")
