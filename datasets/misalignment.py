"""Known in-plane misalignment of a slice: a similarity about the heart plus a smooth field.

Used by the phantom to render misaligned sequences and by the registration benchmarks to warp
real images by a known amount. A slice's record describes the sampling map ``W``: the point
``p`` of the misaligned image shows the anatomy found at ``W(p)`` in the reference (LGE) frame,

    W(p) = c + t + s R(theta) (p - c) + d(p),

with centre ``c`` (the heart), translation ``t``, scale ``s``, rotation ``theta`` and a cubic
B-spline displacement ``d`` whose node coefficients are stored, so the truth is exact and
JSON-able. A registration estimate ``T`` (reference point -> misaligned image point) has residual
``|W(T(q)) - q|`` at reference point ``q``; no inversion needed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy import ndimage

from utils import require_finite_fields


@dataclass(frozen=True)
class MisalignmentConfig:
    """Magnitudes of a breath-hold misalignment between sequences (MyoPS380-like defaults)."""

    max_rotation_deg: float = 5.0
    max_translation_mm: float = 4.0
    max_scale: float = 0.04
    nonrigid_mm: float = 1.5
    nonrigid_grid_mm: float = 25.0
    reach_mm: float = 90.0  # half-width of the square about the heart that carries the field

    def __post_init__(self) -> None:
        require_finite_fields(self, "max_rotation_deg", "max_translation_mm", "nonrigid_mm")
        if not 0 <= self.max_scale < 0.5:
            raise ValueError(f"max_scale must be in [0, 0.5), got {self.max_scale}")
        if not self.nonrigid_grid_mm > 0 or not self.reach_mm > 0:
            raise ValueError("nonrigid_grid_mm and reach_mm must be > 0")

    def scaled(self, strength: float) -> MisalignmentConfig:
        """The same model with every magnitude (rotation, shift, scale, field) times
        ``strength``; the field's grid and reach stay."""
        if not 0 <= strength <= 1 / (2 * self.max_scale + 1e-12):
            raise ValueError(f"strength must be >= 0 and keep max_scale < 0.5, got {strength}")
        return replace(self, max_rotation_deg=self.max_rotation_deg * strength,
                       max_translation_mm=self.max_translation_mm * strength,
                       max_scale=self.max_scale * strength,
                       nonrigid_mm=self.nonrigid_mm * strength)


def _bspline3(t: np.ndarray) -> np.ndarray:
    t = np.abs(t)
    return np.where(t < 1, (4 - 6 * t**2 + 3 * t**3) / 6, np.where(t < 2, (2 - t) ** 3 / 6, 0.0))


def _taps(coord: np.ndarray, n_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Node indices and cubic B-spline weights ``[N, 4]`` around coordinates in node units.

    Only four nodes per axis carry weight, so gathering them beats a dense (BLAS) product and
    keeps the result identical on every machine.
    """
    first = np.floor(coord).astype(np.int64) - 1
    index = first[:, None] + np.arange(4)
    weight = _bspline3(coord[:, None] - index)
    outside = (index < 0) | (index >= n_nodes)
    return np.clip(index, 0, n_nodes - 1), np.where(outside, 0.0, weight)


def spline_grid(coeffs: np.ndarray, origin: tuple[float, float], spacing: float,
                xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Cubic B-spline ``[..., nx, ny]`` from node coefficients ``[..., gx, gy]`` (separable)."""
    ix, wx = _taps((np.asarray(xs, np.float64) - origin[0]) / spacing, coeffs.shape[-2])
    iy, wy = _taps((np.asarray(ys, np.float64) - origin[1]) / spacing, coeffs.shape[-1])
    wx, wy = wx.astype(coeffs.dtype), wy.astype(coeffs.dtype)
    along_x = sum(coeffs[..., ix[:, a], :] * wx[:, a, None] for a in range(4))
    return sum(along_x[..., iy[:, b]] * wy[:, b] for b in range(4))


def displacement_grid(nonrigid: Mapping[str, Any], xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """B-spline displacement ``[2, nx, ny]`` on the grid ``xs x ys``."""
    return spline_grid(np.asarray(nonrigid["coefficients_mm"], np.float64),
                       nonrigid["origin_mm"], nonrigid["spacing_mm"], xs, ys)


def displacement_points(nonrigid: Mapping[str, Any], xy: np.ndarray) -> np.ndarray:
    """B-spline displacement ``[N, 2]`` at scattered points ``[N, 2]``."""
    coeffs = np.asarray(nonrigid["coefficients_mm"], np.float64)
    (x0, y0), g = nonrigid["origin_mm"], nonrigid["spacing_mm"]
    ix, wx = _taps((xy[:, 0] - x0) / g, coeffs.shape[1])
    iy, wy = _taps((xy[:, 1] - y0) / g, coeffs.shape[2])
    out = np.zeros((xy.shape[0], 2))
    for a in range(4):
        for b in range(4):
            out += coeffs[:, ix[:, a], iy[:, b]].T * (wx[:, a] * wy[:, b])[:, None]
    return out


def linear_part(record: Mapping[str, Any]) -> np.ndarray:
    """The 2x2 scaled rotation of a slice record."""
    angle = math.radians(record["rotation_deg"])
    return record["scale"] * np.array([[math.cos(angle), -math.sin(angle)],
                                       [math.sin(angle), math.cos(angle)]])


def sample_slice_misalignment(rng: np.random.Generator, centre_xy: tuple[float, float],
                              xs: np.ndarray, ys: np.ndarray, config: MisalignmentConfig
                              ) -> tuple[dict[str, Any], np.ndarray]:
    """Draw one slice's misalignment about ``centre_xy``; returns the record and ``d`` on the grid.

    The B-spline nodes cover ``reach_mm`` around the heart and the field fades to zero a node
    beyond it, since cardiac and respiratory deformation is local while the chest wall barely
    deforms. The field is scaled so its largest magnitude on the grid ``xs x ys`` is the drawn
    amplitude.
    """
    g = config.nonrigid_grid_mm
    nodes = math.ceil(2 * config.reach_mm / g) + 3
    cx, cy = (float(v) for v in centre_xy)
    rotation = float(rng.uniform(-1, 1)) * config.max_rotation_deg
    shift = config.max_translation_mm * math.sqrt(rng.random())
    direction = float(rng.uniform(0, 2 * math.pi))
    scale = 1 + float(rng.uniform(-1, 1)) * config.max_scale
    target = config.nonrigid_mm * float(rng.uniform(0.5, 1.0))
    raw = rng.standard_normal((2, nodes, nodes))
    corner = [c - config.reach_mm - g for c in (cx, cy)]
    nonrigid: dict[str, Any] = {"origin_mm": corner, "spacing_mm": g, "coefficients_mm": raw}
    field = displacement_grid(nonrigid, xs, ys)
    factor = target / max(float(np.hypot(*field).max()), 1e-12)
    nonrigid["coefficients_mm"] = np.round(raw * factor, 6).tolist()
    nonrigid["amplitude_mm"] = target
    record = {"centre_mm": [cx, cy], "rotation_deg": rotation,
              "translation_mm": [shift * math.cos(direction), shift * math.sin(direction)],
              "scale": scale, "nonrigid": nonrigid}
    return record, field * factor


def _similarity(record: Mapping[str, Any], xy: np.ndarray) -> np.ndarray:
    """``W(p)`` without its field, ``c + t + s R(theta) (p - c)``, for points ``[N, 2]``."""
    centre = np.asarray(record["centre_mm"])
    shift = centre + np.asarray(record["translation_mm"])
    return shift + (xy - centre) @ linear_part(record).T


def apply_slice_misalignment(record: Mapping[str, Any], xy_mm: np.ndarray,
                             inverse: bool = False) -> np.ndarray:
    """``W(p)`` (or ``W^-1(q)``) for in-plane points ``[N, 2]`` in mm.

    The inverse solves ``W(p) = q`` by fixed-point iteration, which converges because the field is
    small and smooth.
    """
    xy = np.asarray(xy_mm, np.float64).reshape(-1, 2)
    if not inverse:
        return _similarity(record, xy) + displacement_points(record["nonrigid"], xy)
    centre, linear = np.asarray(record["centre_mm"]), linear_part(record)
    shift = centre + np.asarray(record["translation_mm"])
    inv = np.linalg.inv(linear)
    p = centre + (xy - shift) @ inv.T
    for _ in range(50):
        new = centre + (xy - shift - displacement_points(record["nonrigid"], p)) @ inv.T
        done = np.abs(new - p).max(initial=0.0) < 1e-9
        p = new
        if done:
            break
    return p


def warp_slice(image: np.ndarray, spacing_xy: tuple[float, float], record: Mapping[str, Any],
               *, is_label: bool) -> np.ndarray:
    """Misalign a real slice ``[Y, X]``: the output at ``p`` is the input at ``W(p)``.

    Coordinates are the slice's own plane in mm, ``(x, y) = (col * sx, row * sy)``; cubic
    interpolation for images, nearest for labels, zero outside.
    """
    sx, sy = spacing_xy
    xs, ys = np.arange(image.shape[1]) * sx, np.arange(image.shape[0]) * sy
    # W(p) on the pixel grid: the field evaluated separably on the grid costs 8 taps per pixel
    # instead of the 16 of scattered points (the training jitter warps every slice).
    points = np.stack(np.meshgrid(xs, ys), axis=-1)  # [Y, X, (x, y)]
    source = (_similarity(record, points.reshape(-1, 2)).reshape(points.shape)
              + displacement_grid(record["nonrigid"], xs, ys).transpose(2, 1, 0))
    coords = np.stack([source[..., 1] / sy, source[..., 0] / sx])
    order = 0 if is_label else 3
    out = ndimage.map_coordinates(image, coords, order=order, mode="constant", cval=0)
    return out.astype(image.dtype, copy=False)
