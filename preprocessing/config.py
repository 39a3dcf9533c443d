"""Preprocessing settings: geometry, intensity window and registration (defaults follow the seed).

Kept apart from :mod:`preprocessing.pipeline` so that the registration dispatch, the pipeline and
the label-free prediction path all read one declaration without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from preprocessing.affine_pooling import AFFINE_POOLINGS
from preprocessing.affine_registration import AffineRegistrationConfig
from preprocessing.mask_affine import MaskAffineConfig
from preprocessing.ngf_affine import NGFAffineConfig
from utils import ConfigRecord, require_finite_fields, setting

#: Affine metrics by name, dispatched by :func:`preprocessing.registration.affine_fits`.
AFFINE_METRICS: tuple[str, ...] = ("ngf", "mattes", "consensus", "segmentation")


@dataclass(frozen=True)
class PreprocessConfig(ConfigRecord):
    """Geometry, intensity and registration settings (defaults follow the seed)."""

    pixel_spacing_mm: float = setting(1.0, cli=False)
    crop_size: int = setting(224, "side of the resampled grid (px of pixel_spacing_mm)")
    roi_size: int = setting(128, "side of the training region of interest (px)")
    max_slice_distance_mm: float = setting(
        5.0, "mm; reference slices without partners this close are dropped",
        flag="max_slice_distance")
    low_percentile: float = setting(0.5, cli=False)
    high_percentile: float = setting(99.5, cli=False)
    affine_registration: bool = setting(True, "skip affine registration", flag="no_affine")
    nonrigid_registration: bool = setting(True, "skip VoxelMorph-style non-rigid registration",
                                          flag="no_nonrigid")
    affine_metric: str = setting(
        "consensus", "consensus: the mean of NGF to the image, NGF to the label and MI (closest "
        "on real MyoPS slices, about 4 s per case); ngf: edge directions (robust to the "
        "sequences' contrasts); mattes: mutual information (closer on simple contrasts); "
        "segmentation: each sequence's myocardium as predicted by --segmenter, laid onto the "
        "label's", choices=AFFINE_METRICS)
    affine_pooling: str = setting(
        "slice", "slice: every slice keeps its own affine fit; stack: one transform for the "
        "whole stack (a sequence that moved as a whole); shrink: each slice's fit pulled toward "
        "the stack's as far as the slices agree within a fit's noise "
        "(preprocessing.affine_pooling)", choices=AFFINE_POOLINGS)
    affine: AffineRegistrationConfig = field(default_factory=AffineRegistrationConfig,
                                             metadata={"cli": False})
    ngf: NGFAffineConfig = field(default_factory=NGFAffineConfig, metadata={"cli": False})
    mask_fit: MaskAffineConfig = field(default_factory=MaskAffineConfig, metadata={"cli": False})

    def __post_init__(self) -> None:
        if self.affine_metric not in AFFINE_METRICS:
            raise ValueError(f"affine_metric must be one of {AFFINE_METRICS}, got "
                             f"{self.affine_metric!r}")
        if self.affine_pooling not in AFFINE_POOLINGS:
            raise ValueError(f"affine_pooling must be one of {AFFINE_POOLINGS}, got "
                             f"{self.affine_pooling!r}")
        require_finite_fields(self, "pixel_spacing_mm", "max_slice_distance_mm", positive=True)
        require_finite_fields(self, "low_percentile", "high_percentile")
        if not 0 < self.roi_size <= self.crop_size:
            raise ValueError(f"need 0 < roi_size <= crop_size, got {self.roi_size}, "
                             f"{self.crop_size}")
        if not 0 <= self.low_percentile < self.high_percentile <= 100:
            raise ValueError("percentiles must satisfy 0 <= low < high <= 100")
        if self.affine.pixel_spacing_mm != self.pixel_spacing_mm:
            raise ValueError("affine.pixel_spacing_mm must equal pixel_spacing_mm")

