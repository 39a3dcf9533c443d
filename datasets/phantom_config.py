"""What shapes a phantom case: acquisition geometry per sequence, anatomy, misalignment, contrast,
noise. Read by :mod:`datasets.phantom` and by the anatomy and rendering modules it calls."""

from __future__ import annotations

import math
from dataclasses import dataclass

from datasets.misalignment import MisalignmentConfig
from utils import require_finite_fields


def _check_range(name: str, value: tuple[float, float], low: float, high: float = math.inf,
                 integer: bool = False) -> None:
    if len(value) != 2 or not low <= value[0] <= value[1] <= high:
        raise ValueError(f"{name} must be (lo, hi) with {low} <= lo <= hi <= {high}, got {value}")
    if integer and not all(isinstance(v, int) for v in value):
        raise ValueError(f"{name} must hold integers, got {value}")


@dataclass(frozen=True)
class SequenceGeometry:
    """Acquisition geometry of one sequence; (lo, hi) ranges are drawn per case."""

    in_plane_mm: float
    n_slices: tuple[int, int]
    slice_spacing_mm: tuple[float, float] = (10.0, 12.0)
    slice_thickness_mm: float = 8.0

    def __post_init__(self) -> None:
        if not self.in_plane_mm > 0 or not self.slice_thickness_mm > 0:
            raise ValueError("in_plane_mm and slice_thickness_mm must be > 0")
        _check_range("n_slices", self.n_slices, 1, integer=True)
        _check_range("slice_spacing_mm", self.slice_spacing_mm, 1e-3)


@dataclass(frozen=True)
class PhantomConfig:
    """Everything that shapes a phantom case; defaults mimic MyoPS380 acquisitions."""

    bssfp: SequenceGeometry = SequenceGeometry(1.172, (9, 12))
    lge: SequenceGeometry = SequenceGeometry(0.8929, (3, 5))
    t2w: SequenceGeometry = SequenceGeometry(0.8929, (6, 8))
    fov_mm: float = 300.0
    phase_fov_fraction: tuple[float, float] = (0.8, 1.0)
    fov_offset_mm: float = 10.0  # random in-plane FOV centre offset per sequence
    stack_offset_mm: float = 2.0  # random through-plane stack offset per sequence
    # LGE and T2w stacks copy the cine slice positions (the usual planning), each then offset
    # through-plane by up to stack_offset_mm; False plans every stack independently.
    planned_from_cine: bool = True
    lv_length_mm: tuple[float, float] = (70.0, 90.0)
    endo_radius_mm: tuple[float, float] = (18.0, 26.0)
    wall_thickness_mm: tuple[float, float] = (6.0, 11.0)
    heart_offset_mm: float = 10.0  # random heart centre offset from its nominal place
    scar_free_fraction: float = 0.1  # cases with edema but no scar
    max_rotation_deg: float = 5.0
    max_translation_mm: float = 4.0
    max_scale: float = 0.04
    nonrigid_mm: float = 1.5
    nonrigid_grid_mm: float = 25.0
    snr: float = 25.0  # brightest tissue over noise sigma; math.inf disables noise
    bias_range: tuple[float, float] = (0.7, 1.3)
    texture: float = 0.04  # relative std of a mild per-slice inhomogeneity (~20 mm scale)
    blur_mm: float = 0.5  # Gaussian sigma of the acquisition point spread, in-plane
    contrast_jitter: float = 0.08
    peak_intensity: tuple[float, float] = (1200.0, 2800.0)
    supersample: int = 3  # in-plane samples per axis at tissue edges
    sub_slices: int = 3  # through-plane samples across the slice thickness
    dtype: str = "int16"

    def __post_init__(self) -> None:
        for name in ("bssfp", "lge", "t2w"):
            if not isinstance(getattr(self, name), SequenceGeometry):
                raise ValueError(f"{name} must be a SequenceGeometry")
        if self.lge.n_slices[1] > min(self.bssfp.n_slices[0], self.t2w.n_slices[0]):
            raise ValueError("LGE is the labelled reference and must have the fewest slices")
        if not self.fov_mm > 0 or not self.nonrigid_grid_mm > 0 or not self.snr > 0:
            raise ValueError("fov_mm, nonrigid_grid_mm and snr must be > 0")
        require_finite_fields(self, "fov_offset_mm", "stack_offset_mm", "heart_offset_mm",
                              "max_rotation_deg", "max_translation_mm", "nonrigid_mm")
        for name in ("max_scale", "contrast_jitter", "texture"):
            if not 0 <= getattr(self, name) < 0.5:
                raise ValueError(f"{name} must be in [0, 0.5), got {getattr(self, name)}")
        if not 0 <= self.blur_mm <= 5:
            raise ValueError(f"blur_mm must be in [0, 5], got {self.blur_mm}")
        if not 0 <= self.scar_free_fraction <= 1:
            raise ValueError(f"scar_free_fraction must be in [0, 1], got {self.scar_free_fraction}")
        _check_range("phase_fov_fraction", self.phase_fov_fraction, 0.3, 1.0)
        _check_range("lv_length_mm", self.lv_length_mm, 20.0, 200.0)
        _check_range("endo_radius_mm", self.endo_radius_mm, 5.0, 60.0)
        _check_range("wall_thickness_mm", self.wall_thickness_mm, 1.0, 30.0)
        _check_range("bias_range", self.bias_range, 1e-3)
        if not self.bias_range[0] <= 1.0 <= self.bias_range[1]:
            raise ValueError(f"bias_range must contain 1, got {self.bias_range}")
        _check_range("peak_intensity", self.peak_intensity, 1.0, 30000.0)
        if not 1 <= self.supersample <= 8 or not 1 <= self.sub_slices <= 9:
            raise ValueError("supersample must be in 1..8 and sub_slices in 1..9")
        if self.dtype not in ("int16", "float32"):
            raise ValueError(f"dtype must be 'int16' or 'float32', got {self.dtype!r}")

    def geometry(self, sequence: str) -> SequenceGeometry:
        return {"bSSFP": self.bssfp, "LGE": self.lge, "T2w": self.t2w}[sequence]

    @property
    def misalignment(self) -> MisalignmentConfig:
        return MisalignmentConfig(
            max_rotation_deg=self.max_rotation_deg, max_translation_mm=self.max_translation_mm,
            max_scale=self.max_scale, nonrigid_mm=self.nonrigid_mm,
            nonrigid_grid_mm=self.nonrigid_grid_mm)
