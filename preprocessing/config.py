"""Preprocessing settings: geometry, intensity window and registration (defaults follow the seed).

Kept apart from :mod:`preprocessing.pipeline` so that the registration dispatch, the pipeline and
the label-free prediction path all read one declaration without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from preprocessing.affine_registration import AffineRegistrationConfig
from preprocessing.mask_affine import MaskAffineConfig
from preprocessing.ngf_affine import NGFAffineConfig
from utils import ConfigRecord, require_finite_fields

#: Affine metrics by name, dispatched by :func:`preprocessing.registration.affine_fits`.
AFFINE_METRICS: tuple[str, ...] = ("ngf", "mattes", "consensus", "segmentation")


@dataclass(frozen=True)
class PreprocessConfig(ConfigRecord):
    """Geometry, intensity and registration settings (defaults follow the seed)."""

    pixel_spacing_mm: float = 1.0
    crop_size: int = 224
    roi_size: int = 128
    max_slice_distance_mm: float = 5.0
    low_percentile: float = 0.5
    high_percentile: float = 99.5
    affine_registration: bool = True
    nonrigid_registration: bool = True
    #: "consensus" (mean of three independent fits, see preprocessing.consensus_affine), "ngf"
    #: (edge directions, see preprocessing.ngf_affine), "mattes" (mutual information) or
    #: "segmentation" (a network's myocardium of each sequence, see preprocessing.mask_affine)
    affine_metric: str = "consensus"
    affine: AffineRegistrationConfig = field(default_factory=AffineRegistrationConfig)
    ngf: NGFAffineConfig = field(default_factory=NGFAffineConfig)
    mask_fit: MaskAffineConfig = field(default_factory=MaskAffineConfig)

    def __post_init__(self) -> None:
        if self.affine_metric not in AFFINE_METRICS:
            raise ValueError(f"affine_metric must be one of {AFFINE_METRICS}, got "
                             f"{self.affine_metric!r}")
        require_finite_fields(self, "pixel_spacing_mm", "max_slice_distance_mm", positive=True)
        require_finite_fields(self, "low_percentile", "high_percentile")
        if not 0 < self.roi_size <= self.crop_size:
            raise ValueError(f"need 0 < roi_size <= crop_size, got {self.roi_size}, "
                             f"{self.crop_size}")
        if not 0 <= self.low_percentile < self.high_percentile <= 100:
            raise ValueError("percentiles must satisfy 0 <= low < high <= 100")
        if self.affine.pixel_spacing_mm != self.pixel_spacing_mm:
            raise ValueError("affine.pixel_spacing_mm must equal pixel_spacing_mm")

