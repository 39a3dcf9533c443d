"""Synthetic multi-sequence short-axis CMR cases: the framework's embedded default dataset.

Each case is drawn from an analytic 3D chest model in world millimetres (body, subcutaneous fat,
lungs, liver, spine, aorta, atria, LV ring with papillary muscles, RV crescent, epicardial fat) and
a pathology model (a scar wedge inside a wider edema wedge). Every sequence samples the model on its
own grid (pixel size, field of view, slice positions) with supersampled partial volume and a
slab-averaged slice profile, then gets tissue contrast, a coil bias field and Rician noise.

bSSFP and T2w are misaligned to LGE (which carries the label) by a known per-slice in-plane
similarity transform about the heart centre plus a smooth B-spline displacement. The transform is
recorded as the *sampling map* ``W``: the sequence image at in-plane world point ``p`` shows the
anatomy found at ``W(p) = c + s R(theta) (p - c) + t + d(p)`` in the LGE/label frame. A
registration estimate ``T`` (LGE point -> sequence point) therefore has residual error
``|W(T(q)) - q|`` at LGE point ``q``; :func:`misalignment_map` evaluates ``W`` and its inverse.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from datasets.labels import MODALITIES
from datasets.misalignment import (
    MisalignmentConfig,
    apply_slice_misalignment,
    displacement_grid,
    linear_part,
    sample_slice_misalignment,
    spline_grid,
)
from datasets.raw import nifti_image
from utils import atomic_path, require_finite_fields, write_json

log = logging.getLogger(__name__)

REFERENCE = "LGE"
MISALIGNED: tuple[str, ...] = tuple(name for name in MODALITIES if name != REFERENCE)

# Regions of the model; each has a tissue (for contrast) and a MyoPS 2020 label code.
(AIR, LUNG, FAT, MUSCLE, LIVER, MARROW, FLUID, VESSEL, WALL, LV_BLOOD, RV_BLOOD, MYO, EDEMA,
 SCAR, PAPILLARY) = range(15)
_REGION_TISSUE = ("air", "lung", "fat", "muscle", "liver", "marrow", "fluid", "blood", "myo",
                  "blood", "blood", "myo", "edema", "scar", "myo")
_REGION_CODE = np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 500, 600, 200, 1220, 2221, 500], np.int16)
_CODES = np.array([0, 200, 500, 600, 1220, 2221], np.int16)  # vote order: ties go to the first
_REGION_CLASS = np.searchsorted(_CODES, _REGION_CODE).astype(np.uint8)

#: Relative tissue signal per sequence (brightest tissue ~1; noise sigma is 1 / snr).
CONTRAST: Mapping[str, Mapping[str, float]] = {
    # Balanced SSFP (T2/T1): bright blood, fat and fluid, dark muscle; edema slightly brighter.
    "bSSFP": {"air": 0.0, "lung": 0.05, "fat": 0.85, "muscle": 0.2, "liver": 0.3, "marrow": 0.5,
              "fluid": 0.75, "blood": 1.0, "myo": 0.26, "edema": 0.32, "scar": 0.28},
    # Inversion recovery nulling normal myocardium; gadolinium-laden scar is brightest.
    "LGE": {"air": 0.0, "lung": 0.03, "fat": 0.55, "muscle": 0.15, "liver": 0.3, "marrow": 0.4,
            "fluid": 0.08, "blood": 0.45, "myo": 0.02, "edema": 0.035, "scar": 1.0},
    # Black-blood fat-suppressed T2 (STIR): dark blood and fat, bright oedema and fluid.
    "T2w": {"air": 0.0, "lung": 0.03, "fat": 0.1, "muscle": 0.24, "liver": 0.18, "marrow": 0.12,
            "fluid": 1.0, "blood": 0.05, "myo": 0.34, "edema": 0.8, "scar": 0.7},
}

_CASE_ID = re.compile(r"^[A-Za-z0-9_-]+$")


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


@dataclass
class PhantomCase:
    """One generated case in memory; ``truth`` is JSON-able (see the module docstring)."""

    case_id: str
    images: dict[str, nib.Nifti1Image]
    label: nib.Nifti1Image
    truth: dict
    truth_labels: dict[str, nib.Nifti1Image]


# ----------------------------------------------------------------------------------- anatomy


def _u(rng: np.random.Generator, low: float, high: float) -> float:
    return float(rng.uniform(low, high))


def _offset(point: Any, dx: float, dy: float) -> list[float]:
    return [float(point[0]) + dx, float(point[1]) + dy]


def _sample_anatomy(rng: np.random.Generator, config: PhantomConfig) -> dict[str, Any]:
    """Draw one chest in world mm (+x patient left, +y anterior, +z towards the LV base).

    Every draw happens whatever the config, so a seed gives the same chest under any config.
    """
    bc = np.array([_u(rng, -10, 10), _u(rng, -10, 10)])
    a, b = _u(rng, 135, 165), _u(rng, 100, 122)
    fat = [_u(rng, 8, 20), _u(rng, 6, 16)]
    body = {"centre_mm": bc.tolist(), "semi_axes_mm": [a, b], "angle_deg": _u(rng, -5, 5),
            "fat_mm": fat, "chest_wall_mm": _u(rng, 10, 16), "back": _u(rng, 0.82, 0.95),
            "harmonics": (rng.uniform(-1, 1, 4) * [0.05, 0.05, 0.03, 0.03]).tolist()}
    z_mid = _u(rng, -20, 20)
    length = _u(rng, *config.lv_length_mm)
    endo, wall = _u(rng, *config.endo_radius_mm), _u(rng, *config.wall_thickness_mm)
    radius, angle = config.heart_offset_mm * math.sqrt(rng.random()), _u(rng, 0, 2 * math.pi)
    centre = bc + [22.0, 18.0] + radius * np.array([math.cos(angle), math.sin(angle)])
    rv_deg = 140.0 + _u(rng, -20, 20)
    heart = {
        "centre_mm": centre.tolist(), "tilt": [_u(rng, -0.06, 0.06), _u(rng, -0.06, 0.06)],
        "z_mid_mm": z_mid, "z_base_mm": z_mid + length / 2, "lv_length_mm": length,
        "endo_semi_axes_mm": [endo, endo * _u(rng, 0.85, 1.0)], "ellipse_deg": _u(rng, 0, 180),
        "wall_mm": wall, "apex_wall_mm": wall * _u(rng, 0.6, 0.9),
        "trabeculation": [_u(rng, 0, 0.03), _u(rng, 0, 0.02), _u(rng, 0, 360), _u(rng, 0, 360)],
        "rv_deg": rv_deg, "rv_distance": _u(rng, 0.85, 1.0),
        "rv_semi_axes": [_u(rng, 0.6, 0.8), _u(rng, 1.15, 1.4)],
        "rv_wall_mm": _u(rng, 2.5, 4.0), "rv_length": _u(rng, 0.85, 0.95),
        "papillary": [[rv_deg + sign * _u(rng, 110, 140), _u(rng, 0.5, 0.6), _u(rng, 3.0, 5.0)]
                      for sign in (1, -1)],
        "fat_mm": _u(rng, 2, 5), "fat_deg": rv_deg + _u(rng, -50, 50),
        # Atria and aortic root above the base: [angle from the RV direction (deg),
        # distance and radius as multiples of the epicardial radius].
        "atria": [[180 + _u(rng, -15, 15), 0.35, _u(rng, 0.65, 0.8)],
                  [55 + _u(rng, -10, 10), 1.2, _u(rng, 0.5, 0.6)],
                  [-40 + _u(rng, -10, 10), 0.2, _u(rng, 0.35, 0.42)]],
    }
    has_scar = bool(rng.random() >= config.scar_free_fraction)
    territory = [-40.0, 100.0, -150.0][int(rng.integers(3))]  # LAD, RCA, LCx from the septum
    scar_width, transmural = _u(rng, 20, 45), bool(rng.random() < 0.5)
    z_half = _u(rng, 15, 28)
    pathology = {
        "scar_present": has_scar, "centre_deg": territory + _u(rng, -20, 20),
        "drift_deg": _u(rng, -10, 10), "z_centre_mm": z_mid + _u(rng, -8, 8),
        "scar_half_width_deg": scar_width, "scar_z_half_mm": z_half,
        "transmurality": _u(rng, 1.1, 1.5) if transmural else _u(rng, 0.3, 0.65),
        "edema_half_width_deg": scar_width + _u(rng, 10, 25),
        "edema_z_half_mm": z_half + _u(rng, 5, 12), "ragged_phase": _u(rng, 0, 360),
    }
    apex = z_mid - length / 2
    lungs = [{"centre_mm": _offset(bc, side * _u(rng, 70, 90), _u(rng, -35, -10)),
              "z_mm": z_mid + _u(rng, 50, 80),
              "semi_axes_mm": [_u(rng, 30, 45), _u(rng, 50, 70), _u(rng, 120, 160)]}
             for side in (1, -1)]
    liver = {"centre_mm": _offset(bc, -_u(rng, 50, 75), _u(rng, -45, -20)),
             "z_mm": apex - _u(rng, 0, 20),
             "semi_axes_mm": [_u(rng, 80, 100), _u(rng, 60, 80), _u(rng, 70, 90)]}
    stomach = {"centre_mm": _offset(bc, _u(rng, 45, 70), _u(rng, -40, -20)),
               "z_mm": apex - _u(rng, 15, 35),
               "semi_axes_mm": [_u(rng, 25, 40), _u(rng, 20, 30), _u(rng, 30, 45)]}
    spine_c = _offset(bc, _u(rng, -5, 5), -body["back"] * b + fat[1] + _u(rng, 30, 38))
    spine = {"centre_mm": spine_c, "radius_mm": _u(rng, 14, 18)}
    aorta = {"centre_mm": _offset(spine_c, _u(rng, 18, 28), _u(rng, 8, 14)),
             "radius_mm": _u(rng, 10, 13)}
    return {"body": body, "lungs": lungs, "liver": liver, "stomach": stomach, "spine": spine,
            "aorta": aorta, "heart": heart, "pathology": pathology}


def _heart_centre(heart: Mapping[str, Any], z: Any) -> tuple[Any, Any]:
    """LV long-axis point at height ``z`` (the axis is slightly tilted against the stack)."""
    dz = np.asarray(z, np.float32) - np.float32(heart["z_mid_mm"])
    (cx, cy), (tx, ty) = heart["centre_mm"], heart["tilt"]
    return cx + tx * dz, cy + ty * dz


def _epi_radius(heart: Mapping[str, Any]) -> float:
    return max(heart["endo_semi_axes_mm"]) + heart["wall_mm"]


def _heart_bounds(heart: Mapping[str, Any], z: Any) -> tuple[Any, Any, float]:
    """A circle (centre x, centre y, radius) holding every cardiac structure at height ``z``.

    It sits between the LV and RV centres, which makes it much smaller than a circle about the
    LV axis; only points inside it pay for the cardiac model.
    """
    cx, cy = _heart_centre(heart, z)
    epi, phi = _epi_radius(heart), math.radians(heart["rv_deg"])
    shift = 0.45 * epi
    radius = 1.7 * epi + heart["rv_wall_mm"] + heart["fat_mm"] + 4.0
    return cx + shift * math.cos(phi), cy + shift * math.sin(phi), radius


def _ellipse(u: np.ndarray, v: np.ndarray, a: Any, b: Any) -> np.ndarray:
    return (u / a) ** 2 + (v / b) ** 2


def _cross_section(organ: Mapping[str, Any], z: float) -> tuple[float, float] | None:
    """Semi-axes of an ellipsoid's cut by the plane at height ``z`` (None when it misses)."""
    a, b, c = organ["semi_axes_mm"]
    q = 1 - ((z - organ["z_mm"]) / c) ** 2
    return None if q <= 0 else (a * math.sqrt(q), b * math.sqrt(q))


def _background(anat: Mapping[str, Any], x: np.ndarray, y: np.ndarray, z: float) -> np.ndarray:
    """Region index of the non-cardiac chest at world points ``(x, y)`` of the plane ``z``."""
    body = anat["body"]
    cos, sin = math.cos(math.radians(body["angle_deg"])), math.sin(math.radians(body["angle_deg"]))
    du, dv = x - body["centre_mm"][0], y - body["centre_mm"][1]
    u, v = cos * du + sin * dv, cos * dv - sin * du
    (a, b), (fx, fy), wall = body["semi_axes_mm"], body["fat_mm"], body["chest_wall_mm"]
    # Outline: an ellipse with a few low harmonics and a flat back (supine on the table).
    rho = np.sqrt(u * u + v * v) + np.float32(1e-3)
    c, s = u / rho, v / rho
    h2c, h2s, h3c, h3s = body["harmonics"]
    shape = (1 + h2c * (c * c - s * s) + h2s * 2 * c * s + h3c * c * (4 * c * c - 3)
             + h3s * s * (3 - 4 * s * s)) ** 2
    back = -body["back"] * b
    out = np.where((_ellipse(u, v, a, b) < shape) & (v > back), FAT, AIR).astype(np.uint8)
    inner = (_ellipse(u, v, a - fx, b - fy) < shape) & (v > back + fy)
    out[inner] = MUSCLE
    cavity = (_ellipse(u, v, a - fx - wall, b - fy - wall) < shape) & (v > back + fy + wall)
    organs = [(lung, LUNG, cavity) for lung in anat["lungs"]]
    organs += [(anat["liver"], LIVER, inner), (anat["stomach"], FLUID, inner)]
    for organ, region, within in organs:
        axes = _cross_section(organ, z)
        if axes is not None:
            (cx, cy) = organ["centre_mm"]
            out[(_ellipse(x - cx, y - cy, *axes) < 1) & within] = region
    for organ, region in ((anat["spine"], MARROW), (anat["aorta"], VESSEL)):
        (cx, cy), radius = organ["centre_mm"], organ["radius_mm"]
        out[(x - cx) ** 2 + (y - cy) ** 2 < radius**2] = region
    return out


def _taper(depth: float, length: float) -> float:
    """Half-ellipsoid profile: 1 at the base plane, 0 from ``length`` below it and above it."""
    return math.sqrt(max(1 - (depth / length) ** 2, 0.0)) if depth >= 0 else 0.0


def _paint_heart(anat: Mapping[str, Any], x: np.ndarray, y: np.ndarray, z: float,
                 out: np.ndarray) -> None:
    """Overwrite regions ``out`` (C-contiguous, shaped like ``x``) with the heart at plane ``z``.

    Working one plane at a time makes every through-plane quantity (tapers, wedge widths) a
    scalar, and planes beyond the heart cost nothing.
    """
    heart = anat["heart"]
    length, apex_wall = heart["lv_length_mm"], heart["apex_wall_mm"]
    depth = heart["z_base_mm"] - z
    if not -45 < depth < length + apex_wall:
        return
    if not out.flags.c_contiguous:
        raise ValueError("out must be C-contiguous to be painted in place")
    flat = out.reshape(-1)
    bx, by, radius = _heart_bounds(heart, z)
    x, y = np.ravel(x), np.ravel(y)
    near = np.flatnonzero((x - bx) ** 2 + (y - by) ** 2 < radius**2)
    if near.size == 0:
        return
    cx, cy = _heart_centre(heart, z)
    dx, dy, reg = x[near] - cx, y[near] - cy, flat[near]
    r = np.sqrt(dx * dx + dy * dy) + np.float32(1e-4)
    epi, phi = _epi_radius(heart), math.radians(heart["rv_deg"])
    if depth < 6:
        _paint_atria(heart, dx, dy, depth, reg)
    f_endo, f_epi = _taper(depth, length), _taper(depth, length + apex_wall)
    f_rv = _taper(depth, heart["rv_length"] * length)
    if f_epi > 0:
        (ea, eb), wall = heart["endo_semi_axes_mm"], heart["wall_mm"]
        psi = math.radians(heart["ellipse_deg"])
        c = (dx * math.cos(psi) + dy * math.sin(psi)) / r
        s = (dy * math.cos(psi) - dx * math.sin(psi)) / r
        c2, s2 = c * c, s * s
        t3, t5, p3, p5 = heart["trabeculation"]
        p3, p5 = math.radians(p3), math.radians(p5)
        rough = (1 + t3 * (math.cos(p3) * c * (4 * c2 - 3) - math.sin(p3) * s * (3 - 4 * s2))
                 + t5 * (math.cos(p5) * c * (16 * c2 * c2 - 20 * c2 + 5)
                         - math.sin(p5) * s * (16 * s2 * s2 - 20 * s2 + 5)))
        r_endo = f_endo * rough / np.sqrt(c2 / ea**2 + s2 / eb**2)
        r_epi = f_epi / np.sqrt(c2 / (ea + wall) ** 2 + s2 / (eb + wall) ** 2)
        in_epi = r < r_epi
        # RV: an ellipse beside the LV minus the LV epicardium leaves the crescent.
        fat_dir = math.radians(heart["fat_deg"])
        fat = heart["fat_mm"] * np.maximum(
            (dx * math.cos(fat_dir) + dy * math.sin(fat_dir)) / r, 0)
        envelope = r < r_epi + fat
        rv_outer = np.zeros_like(in_epi)
        if f_rv > 0:
            u = math.cos(phi) * dx + math.sin(phi) * dy - heart["rv_distance"] * epi * f_rv
            v = math.cos(phi) * dy - math.sin(phi) * dx
            a_rv, b_rv = (k * epi * f_rv for k in heart["rv_semi_axes"])
            rv_wall = heart["rv_wall_mm"]
            rv_outer = (_ellipse(u, v, a_rv + rv_wall, b_rv + rv_wall) < 1) & ~in_epi
            envelope |= _ellipse(u, v, a_rv + rv_wall + fat, b_rv + rv_wall + fat) < 1
        reg[envelope & (fat > 0.5) & ~in_epi & ~rv_outer] = FAT
        if f_rv > 0:
            reg[rv_outer] = WALL
            reg[rv_outer & (_ellipse(u, v, a_rv, b_rv) < 1)] = RV_BLOOD
        myo = np.flatnonzero(in_epi & (r >= r_endo))
        if myo.size:
            wall_depth = (r[myo] - r_endo[myo]) / np.maximum(r_epi[myo] - r_endo[myo], 1e-3)
            angle = np.arctan2(dy[myo], dx[myo]) - phi
            reg[myo] = _pathology(anat["pathology"], angle, z, wall_depth)
        reg[r < r_endo] = LV_BLOOD
        if 0.15 < depth / length < 0.8:
            for angle_deg, fraction, size in heart["papillary"]:
                where, reach = math.radians(angle_deg), fraction * epi * f_endo
                d2 = (dx - reach * math.cos(where)) ** 2 + (dy - reach * math.sin(where)) ** 2
                reg[(d2 < (size * f_endo) ** 2) & (r < r_endo)] = PAPILLARY
    flat[near] = reg


def _paint_atria(heart: Mapping[str, Any], dx: np.ndarray, dy: np.ndarray, depth: float,
                 reg: np.ndarray) -> None:
    """Atria and aortic root (blood with a thin wall) above the base; ventricles paint later."""
    epi, phi = _epi_radius(heart), math.radians(heart["rv_deg"])
    profile = epi * math.sqrt(max(1 - ((depth + 18) / 24) ** 2, 0.0))
    if profile <= 0:
        return
    for rel_deg, distance, radius in heart["atria"]:
        angle = phi + math.radians(rel_deg)
        ox, oy = distance * epi * math.cos(angle), distance * epi * math.sin(angle)
        d2 = (dx - ox) ** 2 + (dy - oy) ** 2
        rr = radius * profile
        reg[(d2 < (rr + 2) ** 2) & (reg != VESSEL)] = WALL
        reg[d2 < rr**2] = VESSEL


def _pathology(path: Mapping[str, Any], angle: np.ndarray, z: float,
               wall_depth: np.ndarray) -> np.ndarray:
    """Myocardial regions from angle about the LV axis (0 = septum), height and wall depth.

    Edema is a transmural wedge; the scar is a narrower wedge inside it whose reach from the
    endocardium falls off towards its edges (infarcts grow from the subendocardium outwards).
    """
    rel_z = z - path["z_centre_mm"]
    centre = math.radians(path["centre_deg"] + path["drift_deg"] * rel_z / path["scar_z_half_mm"])
    rel = (angle - centre + np.pi) % (2 * np.pi) - np.pi

    def half_width(width_deg: float, z_half: float) -> float:
        return math.radians(width_deg) * math.sqrt(max(1 - (rel_z / z_half) ** 2, 0.0))

    out = np.full(angle.shape, MYO, np.uint8)
    out[np.abs(rel) < half_width(path["edema_half_width_deg"], path["edema_z_half_mm"])] = EDEMA
    scar_half = half_width(path["scar_half_width_deg"], path["scar_z_half_mm"])
    if path["scar_present"] and scar_half > 0:
        across = np.maximum(1 - (rel / scar_half) ** 2, 0)
        ragged = 1 + 0.12 * np.sin(7 * rel + z / 6 + math.radians(path["ragged_phase"]))
        reach = path["transmurality"] * np.sqrt(across) * ragged
        out[(np.abs(rel) < scar_half) & (wall_depth < reach)] = SCAR
    return out


def _regions(anat: Mapping[str, Any], x: np.ndarray, y: np.ndarray, z: float) -> np.ndarray:
    out = _background(anat, x, y, z)
    _paint_heart(anat, x, y, z, out)
    return out


# ------------------------------------------------------------------------ geometry and motion


def _sample_geometry(rng: np.random.Generator, config: PhantomConfig,
                     anat: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-sequence grids: own pixel size, FOV centre, slice count, spacing and z positions."""
    # Planned around the heart (the scanner isocentre), between it and the body centre.
    body_c = (np.asarray(anat["body"]["centre_mm"]) + anat["heart"]["centre_mm"]) / 2
    z_mid = anat["heart"]["z_mid_mm"]
    base_shift = {"bSSFP": (2.0, 10.0)}  # cine stacks reach past the base into the atria
    sequences = {}
    for name in MODALITIES:
        geom = config.geometry(name)
        s = geom.in_plane_mm
        nx = max(1, round(config.fov_mm / s))
        ny = max(1, round(config.fov_mm * _u(rng, *config.phase_fov_fraction) / s))
        nz = int(rng.integers(geom.n_slices[0], geom.n_slices[1] + 1))
        dz = _u(rng, *geom.slice_spacing_mm)
        centre = body_c + rng.uniform(-1, 1, 2) * config.fov_offset_mm
        z_centre = z_mid + _u(rng, *base_shift.get(name, (0.0, 0.0)))
        z_centre += _u(rng, -1, 1) * config.stack_offset_mm
        z_first = z_centre - (nz - 1) / 2 * dz
        if config.planned_from_cine and name != "bSSFP":
            z_first, dz = _copy_cine_positions(sequences["bSSFP"], nz, z_centre)
            z_first += _u(rng, -1, 1) * config.stack_offset_mm
        affine = np.diag([s, s, dz, 1.0])
        affine[:3, 3] = [centre[0] - (nx - 1) / 2 * s, centre[1] - (ny - 1) / 2 * s, z_first]
        slice_z = (affine[2, 3] + dz * np.arange(nz)).tolist()
        sequences[name] = {
            "shape": [nx, ny, nz], "affine": affine.tolist(), "spacing_mm": [s, s, dz],
            "slice_thickness_mm": geom.slice_thickness_mm, "fov_mm": [nx * s, ny * s],
            "fov_centre_mm": centre.tolist(), "slice_z_mm": slice_z,
            # LV axis point of every slice in the label (LGE) frame, before any misalignment.
            "heart_centre_mm": [[float(v) for v in _heart_centre(anat["heart"], z)]
                                for z in slice_z],
            "misalignment": None,
        }
    return sequences


def _copy_cine_positions(cine: Mapping[str, Any], nz: int, z_centre: float) -> tuple[float, float]:
    """First z and spacing of ``nz`` consecutive cine slices centred nearest to ``z_centre``."""
    cine_z = np.asarray(cine["slice_z_mm"])
    if nz > len(cine_z):
        raise ValueError(f"cannot copy {nz} slice positions from a {len(cine_z)}-slice cine stack")
    means = np.convolve(cine_z, np.ones(nz) / nz, mode="valid")
    start = int(np.argmin(np.abs(means - z_centre)))
    return float(cine_z[start]), float(cine["spacing_mm"][2])


def _grid_axes(seq: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """World x and y of the voxel centres of a sequence."""
    affine, (nx, ny, _) = np.asarray(seq["affine"]), seq["shape"]
    return affine[0, 3] + affine[0, 0] * np.arange(nx), affine[1, 3] + affine[1, 1] * np.arange(ny)


def _sample_misalignment(rng: np.random.Generator, config: PhantomConfig,
                         anat: Mapping[str, Any], seq: Mapping[str, Any]
                         ) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Per-slice similarity about the heart centre plus a smooth B-spline field (mm).

    Returns the JSON record and the dense displacement ``[2, nx, ny]`` of every slice, which the
    renderer reuses (it equals the recorded field to within the 1e-6 mm rounding).
    """
    xs, ys = _grid_axes(seq)
    slices, fields = [], []
    for z in seq["slice_z_mm"]:
        record, field = sample_slice_misalignment(rng, _heart_centre(anat["heart"], z), xs, ys,
                                                  config.misalignment)
        slices.append(record)
        fields.append(field)
    return {"reference": REFERENCE, "slices": slices}, fields


def misalignment_map(sequence_truth: Mapping[str, Any], slice_index: int, xy_mm: np.ndarray,
                     inverse: bool = False) -> np.ndarray:
    """Apply a slice's recorded sampling map ``W`` (or ``W^-1``) to in-plane world points.

    ``W`` takes a point of the sequence image to the LGE/label point whose anatomy it shows, so
    sampling the LGE label at ``W(p)`` reproduces the sequence's truth label. ``xy_mm`` is
    ``[N, 2]``; sequences without misalignment (LGE) map points to themselves.
    """
    misalignment = sequence_truth["misalignment"]
    if misalignment is None:
        return np.asarray(xy_mm, np.float64).reshape(-1, 2).copy()
    return apply_slice_misalignment(misalignment["slices"][slice_index], xy_mm, inverse)


# ----------------------------------------------------------------------------- rendering


def _sampling_grid(seq: Mapping[str, Any], fields: list[np.ndarray] | None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Anatomy-frame position of every voxel centre ``[nz, nx, ny]``; each slice's linear part."""
    xs, ys = _grid_axes(seq)
    nz = seq["shape"][2]
    qx = np.empty((nz, xs.size, ys.size), np.float32)
    qy = np.empty_like(qx)
    linear = np.tile(np.eye(2), (nz, 1, 1))
    for k in range(nz):
        if seq["misalignment"] is None:
            qx[k], qy[k] = xs[:, None], ys[None, :]
            continue
        sl = seq["misalignment"]["slices"][k]
        linear[k] = linear_part(sl)
        (cx, cy), (tx, ty) = sl["centre_mm"], sl["translation_mm"]
        u, v = xs[:, None] - cx, ys[None, :] - cy
        disp = displacement_grid(sl["nonrigid"], xs, ys) if fields is None else fields[k]
        qx[k] = cx + tx + linear[k, 0, 0] * u + linear[k, 0, 1] * v + disp[0]
        qy[k] = cy + ty + linear[k, 1, 0] * u + linear[k, 1, 1] * v + disp[1]
    return qx, qy, linear


def _edges(regions: np.ndarray) -> np.ndarray:
    """Pixels ``[nz, nx, ny]`` whose region differs from an in-plane neighbour at any depth."""
    edge = np.zeros((regions.shape[0], *regions.shape[2:]), bool)
    for axis in (1, 2):
        step = np.diff(regions, axis=axis + 1).any(axis=1)
        ahead, behind = [slice(None)] * 3, [slice(None)] * 3
        ahead[axis], behind[axis] = slice(1, None), slice(None, -1)
        edge[tuple(ahead)] |= step
        edge[tuple(behind)] |= step
    return edge


def _vote(regions: np.ndarray, axis: int) -> np.ndarray:
    """Label class held by most samples along ``axis`` (ties go to the lower class)."""
    classes = _REGION_CLASS[regions]
    counts = np.stack([(classes == c).sum(axis=axis, dtype=np.int16) for c in range(_CODES.size)])
    return counts.argmax(axis=0).astype(np.uint8)


def _render(anat: Mapping[str, Any], seq: Mapping[str, Any], lut: np.ndarray,
            config: PhantomConfig, fields: list[np.ndarray] | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """Relative signal and label codes ``[nx, ny, nz]`` of one sequence.

    The chest is sampled at the slab centre, the heart at ``sub_slices`` depths through the slab
    (its shape changes quickly along z), and pixels on any tissue edge again ``supersample**2``
    times in-plane, so edges carry partial volume without supersampling the whole field of view.
    Labels take the majority of the same samples. Sub-pixel samples share their pixel's non-rigid
    displacement, which changes by hundredths of a millimetre across a pixel.
    """
    qx, qy, linear = _sampling_grid(seq, fields)
    nz = qx.shape[0]
    zs = np.asarray(seq["slice_z_mm"], np.float32)
    nsub = config.sub_slices
    dz = (seq["slice_thickness_mm"] * ((np.arange(nsub) + 0.5) / nsub - 0.5)).astype(np.float32)
    chest = np.stack([_background(anat, qx[k], qy[k], float(zs[k])) for k in range(nz)])
    edge = _edges(chest[:, None])
    signal, classes = lut[chest], _REGION_CLASS[chest]
    cx, cy, radius = _heart_bounds(anat["heart"], zs[:, None, None])
    near = ((qx - cx) ** 2 + (qy - cy) ** 2 < (radius + 2) ** 2).any(axis=0)
    if near.any():
        # The heart's box: everything outside it is chest only, sampled at the slab centre.
        rows, cols = np.flatnonzero(near.any(axis=1)), np.flatnonzero(near.any(axis=0))
        box = (slice(None), slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        heart = np.repeat(chest[box][:, None], nsub, axis=1)
        for k in range(nz):
            for d in range(nsub):
                _paint_heart(anat, qx[box][k], qy[box][k], float(zs[k] + dz[d]), heart[k, d])
        signal[box] = lut[heart].mean(axis=1)
        classes[box] = _vote(heart, axis=1)
        edge[box] |= _edges(heart)
        near[box[1:]] = True
    m = config.supersample
    offset = ((np.arange(m) + 0.5) / m - 0.5) * seq["spacing_mm"][0]
    ox, oy = (grid.ravel() for grid in np.meshgrid(offset, offset, indexing="ij"))
    for in_box, depths in ((False, np.zeros(1, np.float32)), (True, dz)):
        k, i, j = np.nonzero(edge & (near[None] == in_box))
        if not k.size:
            continue
        lin = linear[k]
        sx = (qx[k, i, j][:, None] + lin[:, 0, :1] * ox + lin[:, 0, 1:] * oy).astype(np.float32)
        sy = (qy[k, i, j][:, None] + lin[:, 1, :1] * ox + lin[:, 1, 1:] * oy).astype(np.float32)
        sub = np.empty((k.size, depths.size, m * m), np.uint8)
        bounds = np.searchsorted(k, np.arange(nz + 1))  # np.nonzero sorts by slice
        sample = _regions if in_box else _background
        for kk in range(nz):
            part = slice(bounds[kk], bounds[kk + 1])
            for d, depth in enumerate(depths):
                if bounds[kk] < bounds[kk + 1]:
                    sub[part, d] = sample(anat, sx[part], sy[part], float(zs[kk] + depth))
        sub = sub.reshape(k.size, -1)
        signal[k, i, j] = lut[sub].mean(axis=1)
        classes[k, i, j] = _vote(sub, axis=1)
    return np.moveaxis(signal, 0, -1), np.moveaxis(_CODES[classes], 0, -1)


def _acquire(signal: np.ndarray, seq: Mapping[str, Any], rng: np.random.Generator,
             config: PhantomConfig) -> tuple[np.ndarray, dict[str, Any]]:
    """Blur, coil bias, mild inhomogeneity, Rician noise and scanner scaling of a signal volume.

    The image is the magnitude of complex data, so noise is added to real and imaginary parts
    before taking the modulus; that gives the Rician floor seen in air and nulled myocardium.
    """
    s = seq["spacing_mm"][0]
    if config.blur_mm > 0:  # acquired at lower resolution than reconstructed
        signal = ndimage.gaussian_filter(signal, (config.blur_mm / s, config.blur_mm / s, 0))
    xs, ys = _grid_axes(seq)
    half = config.fov_mm / 2
    xn = ((xs - seq["fov_centre_mm"][0]) / half).astype(np.float32)[:, None, None]
    yn = ((ys - seq["fov_centre_mm"][1]) / half).astype(np.float32)[None, :, None]
    zs = np.asarray(seq["slice_z_mm"])
    zn = ((zs - zs.mean()) / 300.0).astype(np.float32)[None, None, :]
    c = rng.standard_normal(6).astype(np.float32)
    field = c[0] * xn + c[1] * yn + c[2] * xn * yn + c[3] * xn**2 + c[4] * yn**2 + c[5] * zn
    field -= field.mean()
    field /= max(float(np.abs(field).max()), 1e-12)
    low, high = config.bias_range
    gain = (low + high) / 2 + (high - low) / 2 * _u(rng, 0.5, 1.0) * field
    bias_min, bias_max = float(gain.min()), float(gain.max())
    g = 20.0  # mm between nodes of the per-slice inhomogeneity field
    nodes = [math.ceil((axis[-1] - axis[0]) / g) + 3 for axis in (xs, ys)]
    texture = spline_grid(rng.standard_normal((signal.shape[2], *nodes)).astype(np.float32),
                           (xs[0] - g, ys[0] - g), g, xs, ys)
    texture *= config.texture / max(float(texture.std()), 1e-12)
    gain *= np.moveaxis(np.clip(1 + texture, 0.5, 1.5), 0, -1)
    sigma = 0.0 if math.isinf(config.snr) else 1.0 / config.snr
    noise = rng.standard_normal((2, *signal.shape), dtype=np.float32)
    noise *= sigma
    noise[0] += signal * gain
    peak = _u(rng, *config.peak_intensity)
    image = np.hypot(noise[0], noise[1])
    image *= peak
    if config.dtype == "int16":
        image = np.clip(np.rint(image), 0, np.iinfo(np.int16).max).astype(np.int16)
    record = {"peak": peak, "noise_sigma": sigma * peak, "bias_min": bias_min,
              "bias_max": bias_max}
    return image, record


def _config_record(config: PhantomConfig) -> dict[str, Any]:
    """The config as strict JSON (an infinite SNR is recorded as the string "inf")."""
    record = dataclasses.asdict(config)
    record = {key: "inf" if value == math.inf else value for key, value in record.items()}
    return json.loads(json.dumps(record))  # tuples become lists, as when read back


# ------------------------------------------------------------------------------- public API


def generate_case(case_id: str, rng: np.random.Generator,
                  config: PhantomConfig = PhantomConfig()) -> PhantomCase:
    """Draw and render one case.

    Anatomy, geometry, misalignment and acquisition use separate child generators, so changing
    e.g. the misalignment magnitudes leaves the anatomy and slice positions of a seed unchanged.
    """
    if not isinstance(case_id, str) or not _CASE_ID.match(case_id):
        raise ValueError(f"case_id must be letters, digits, '_' or '-', got {case_id!r}")
    anat_rng, geom_rng, motion_rng, acq_rng = rng.spawn(4)
    anat = _sample_anatomy(anat_rng, config)
    sequences = _sample_geometry(geom_rng, config, anat)
    fields = {}
    for name in MISALIGNED:
        sequences[name]["misalignment"], fields[name] = _sample_misalignment(
            motion_rng, config, anat, sequences[name])
    images, labels = {}, {}
    for name in MODALITIES:
        seq = sequences[name]
        contrast = {tissue: value * (1 + _u(acq_rng, -1, 1) * config.contrast_jitter)
                    for tissue, value in CONTRAST[name].items()}
        lut = np.array([contrast[tissue] for tissue in _REGION_TISSUE], np.float32)
        signal, codes = _render(anat, seq, lut, config, fields.get(name))
        image, record = _acquire(signal, seq, acq_rng, config)
        seq["intensity"] = {"contrast": contrast, **record}
        affine = np.asarray(seq["affine"])
        images[name], labels[name] = nifti_image(image, affine), nifti_image(codes, affine)
    truth = {
        "case_id": case_id, "generator": "datasets.phantom", "reference": REFERENCE,
        "label_codes": {"normal_myocardium": 200, "lv_blood_pool": 500, "rv_blood_pool": 600,
                        "edema": 1220, "scar": 2221},
        "convention": "world mm; in-plane sampling map W(p) = c + scale*R(rotation)(p - c) + "
                      "translation + d(p), p in the sequence image, W(p) in the LGE/label frame; "
                      "d is a cubic B-spline with coefficients [2, nx, ny] on the node grid "
                      "origin + spacing*(i, j)",
        "anatomy": anat, "sequences": sequences, "config": _config_record(config),
        "seed": None,
    }
    return PhantomCase(case_id, images, labels[REFERENCE], truth,
                       {name: labels[name] for name in MISALIGNED})


def case_paths(out: str | Path, case_id: str) -> dict[str, Path]:
    """Every file of one case in the MyoPS380 layout plus the phantom truth."""
    out = Path(out)
    paths = {name: out / "Raw_data" / name / f"{case_id}.nii.gz" for name in MODALITIES}
    paths["label"] = out / "Raw_data" / "label" / f"{case_id}_gt.nii.gz"
    for name in MISALIGNED:
        paths[f"truth_{name}"] = out / "phantom_truth" / f"{case_id}_{name}_gt.nii.gz"
    paths["truth"] = out / "phantom_truth" / f"{case_id}.json"  # written last: marks completion
    return paths


def write_case(case: PhantomCase, out: str | Path) -> None:
    """Write one case atomically; the truth JSON goes last so its presence means complete."""
    paths = case_paths(out, case.case_id)
    volumes = {**case.images, "label": case.label,
               **{f"truth_{name}": image for name, image in case.truth_labels.items()}}
    for key, image in volumes.items():
        with atomic_path(paths[key]) as tmp:
            nib.save(image, str(tmp))
    write_json(paths["truth"], case.truth)


def write_phantom_dataset(out: str | Path, n_cases: int, seed: int = 1234,
                          config: PhantomConfig = PhantomConfig(),
                          overwrite: bool = False) -> list[str]:
    """Write ``case0001 .. caseNNNN`` under ``out`` and return their ids.

    Case ``i`` is drawn from ``default_rng([seed, i])``, so it is the same whatever ``n_cases``.
    Complete cases are kept unless ``overwrite``; one written with another seed or config is an
    error rather than being silently mixed into the dataset.
    """
    if isinstance(n_cases, bool) or not isinstance(n_cases, int) or not 1 <= n_cases <= 9999:
        raise ValueError(f"n_cases must be an integer in 1..9999, got {n_cases!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    wanted_config = _config_record(config)
    case_ids = []
    for index in range(1, n_cases + 1):
        case_id = f"case{index:04d}"
        paths = case_paths(out, case_id)
        if not overwrite and all(path.is_file() for path in paths.values()):
            recorded = json.loads(paths["truth"].read_text())
            if recorded.get("seed") != [seed, index] or recorded.get("config") != wanted_config:
                raise FileExistsError(f"{paths['truth']}: written with another seed or config; "
                                      "use overwrite=True or another folder")
            log.info("%s already complete, kept", case_id)
        else:
            case = generate_case(case_id, np.random.default_rng([seed, index]), config)
            case.truth["seed"] = [seed, index]
            write_case(case, out)
            log.info("%s written", case_id)
        case_ids.append(case_id)
    return case_ids
