"""The analytic chest, heart and pathology model behind the synthetic CMR phantom.

A case's anatomy is a JSON-able dict in world millimetres (+x patient left, +y anterior, +z
towards the LV base) drawn by :func:`sample_anatomy`: body outline with subcutaneous fat, lungs,
liver, stomach, spine, aorta, atria, an LV ring with papillary muscles, the RV crescent,
epicardial fat, and a pathology (a scar wedge inside a wider edema wedge). The model is
evaluated point-wise: :func:`background_at` and :func:`regions_at` give a region index per
world point of one plane, each region having a tissue (for contrast) and a MyoPS 2020 label
code. It is kept apart from :mod:`datasets.phantom_render`, which decides where and how often to
sample it, so the shapes can be read and changed without the acquisition around them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from datasets.phantom_config import PhantomConfig

# Regions of the model; each has a tissue (for contrast) and a MyoPS 2020 label code.
(AIR, LUNG, FAT, MUSCLE, LIVER, MARROW, FLUID, VESSEL, WALL, LV_BLOOD, RV_BLOOD, MYO, EDEMA,
 SCAR, PAPILLARY) = range(15)
REGION_TISSUE = ("air", "lung", "fat", "muscle", "liver", "marrow", "fluid", "blood", "myo",
                 "blood", "blood", "myo", "edema", "scar", "myo")
_REGION_CODE = np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 500, 600, 200, 1220, 2221, 500], np.int16)
CODES = np.array([0, 200, 500, 600, 1220, 2221], np.int16)  # vote order: ties go to the first
REGION_CLASS = np.searchsorted(CODES, _REGION_CODE).astype(np.uint8)


def uniform(rng: np.random.Generator, low: float, high: float) -> float:
    """One draw from ``[low, high)`` as a plain float (every random size of the phantom)."""
    return float(rng.uniform(low, high))


def _offset(point: Any, dx: float, dy: float) -> list[float]:
    return [float(point[0]) + dx, float(point[1]) + dy]


def sample_anatomy(rng: np.random.Generator, config: PhantomConfig) -> dict[str, Any]:
    """Draw one chest in world mm (+x patient left, +y anterior, +z towards the LV base).

    Every draw happens whatever the config, so a seed gives the same chest under any config.
    """
    bc = np.array([uniform(rng, -10, 10), uniform(rng, -10, 10)])
    a, b = uniform(rng, 135, 165), uniform(rng, 100, 122)
    fat = [uniform(rng, 8, 20), uniform(rng, 6, 16)]
    body = {"centre_mm": bc.tolist(), "semi_axes_mm": [a, b], "angle_deg": uniform(rng, -5, 5),
            "fat_mm": fat, "chest_wall_mm": uniform(rng, 10, 16), "back": uniform(rng, 0.82, 0.95),
            "harmonics": (rng.uniform(-1, 1, 4) * [0.05, 0.05, 0.03, 0.03]).tolist()}
    z_mid = uniform(rng, -20, 20)
    length = uniform(rng, *config.lv_length_mm)
    endo, wall = uniform(rng, *config.endo_radius_mm), uniform(rng, *config.wall_thickness_mm)
    radius, angle = config.heart_offset_mm * math.sqrt(rng.random()), uniform(rng, 0, 2 * math.pi)
    centre = bc + [22.0, 18.0] + radius * np.array([math.cos(angle), math.sin(angle)])
    rv_deg = 140.0 + uniform(rng, -20, 20)
    heart = {
        "centre_mm": centre.tolist(),
        "tilt": [uniform(rng, -0.06, 0.06), uniform(rng, -0.06, 0.06)],
        "z_mid_mm": z_mid, "z_base_mm": z_mid + length / 2, "lv_length_mm": length,
        "endo_semi_axes_mm": [endo, endo * uniform(rng, 0.85, 1.0)],
        "ellipse_deg": uniform(rng, 0, 180),
        "wall_mm": wall, "apex_wall_mm": wall * uniform(rng, 0.6, 0.9),
        "trabeculation": [uniform(rng, 0, 0.03), uniform(rng, 0, 0.02), uniform(rng, 0, 360),
                          uniform(rng, 0, 360)],
        "rv_deg": rv_deg, "rv_distance": uniform(rng, 0.85, 1.0),
        "rv_semi_axes": [uniform(rng, 0.6, 0.8), uniform(rng, 1.15, 1.4)],
        "rv_wall_mm": uniform(rng, 2.5, 4.0), "rv_length": uniform(rng, 0.85, 0.95),
        "papillary": [[rv_deg + sign * uniform(rng, 110, 140), uniform(rng, 0.5, 0.6),
                       uniform(rng, 3.0, 5.0)] for sign in (1, -1)],
        "fat_mm": uniform(rng, 2, 5), "fat_deg": rv_deg + uniform(rng, -50, 50),
        # Atria and aortic root above the base: [angle from the RV direction (deg),
        # distance and radius as multiples of the epicardial radius].
        "atria": [[180 + uniform(rng, -15, 15), 0.35, uniform(rng, 0.65, 0.8)],
                  [55 + uniform(rng, -10, 10), 1.2, uniform(rng, 0.5, 0.6)],
                  [-40 + uniform(rng, -10, 10), 0.2, uniform(rng, 0.35, 0.42)]],
    }
    has_scar = bool(rng.random() >= config.scar_free_fraction)
    territory = [-40.0, 100.0, -150.0][int(rng.integers(3))]  # LAD, RCA, LCx from the septum
    scar_width, transmural = uniform(rng, 20, 45), bool(rng.random() < 0.5)
    z_half = uniform(rng, 15, 28)
    pathology = {
        "scar_present": has_scar, "centre_deg": territory + uniform(rng, -20, 20),
        "drift_deg": uniform(rng, -10, 10), "z_centre_mm": z_mid + uniform(rng, -8, 8),
        "scar_half_width_deg": scar_width, "scar_z_half_mm": z_half,
        "transmurality": uniform(rng, 1.1, 1.5) if transmural else uniform(rng, 0.3, 0.65),
        "edema_half_width_deg": scar_width + uniform(rng, 10, 25),
        "edema_z_half_mm": z_half + uniform(rng, 5, 12), "ragged_phase": uniform(rng, 0, 360),
    }
    apex = z_mid - length / 2
    lungs = [{"centre_mm": _offset(bc, side * uniform(rng, 70, 90), uniform(rng, -35, -10)),
              "z_mm": z_mid + uniform(rng, 50, 80),
              "semi_axes_mm": [uniform(rng, 30, 45), uniform(rng, 50, 70), uniform(rng, 120, 160)]}
             for side in (1, -1)]
    liver = {"centre_mm": _offset(bc, -uniform(rng, 50, 75), uniform(rng, -45, -20)),
             "z_mm": apex - uniform(rng, 0, 20),
             "semi_axes_mm": [uniform(rng, 80, 100), uniform(rng, 60, 80), uniform(rng, 70, 90)]}
    stomach = {"centre_mm": _offset(bc, uniform(rng, 45, 70), uniform(rng, -40, -20)),
               "z_mm": apex - uniform(rng, 15, 35),
               "semi_axes_mm": [uniform(rng, 25, 40), uniform(rng, 20, 30), uniform(rng, 30, 45)]}
    spine_c = _offset(bc, uniform(rng, -5, 5), -body["back"] * b + fat[1] + uniform(rng, 30, 38))
    spine = {"centre_mm": spine_c, "radius_mm": uniform(rng, 14, 18)}
    aorta = {"centre_mm": _offset(spine_c, uniform(rng, 18, 28), uniform(rng, 8, 14)),
             "radius_mm": uniform(rng, 10, 13)}
    return {"body": body, "lungs": lungs, "liver": liver, "stomach": stomach, "spine": spine,
            "aorta": aorta, "heart": heart, "pathology": pathology}


def heart_centre(heart: Mapping[str, Any], z: Any) -> tuple[Any, Any]:
    """LV long-axis point at height ``z`` (the axis is slightly tilted against the stack)."""
    dz = np.asarray(z, np.float32) - np.float32(heart["z_mid_mm"])
    (cx, cy), (tx, ty) = heart["centre_mm"], heart["tilt"]
    return cx + tx * dz, cy + ty * dz


def _epi_radius(heart: Mapping[str, Any]) -> float:
    return max(heart["endo_semi_axes_mm"]) + heart["wall_mm"]


def heart_bounds(heart: Mapping[str, Any], z: Any) -> tuple[Any, Any, float]:
    """A circle (centre x, centre y, radius) holding every cardiac structure at height ``z``.

    It sits between the LV and RV centres, which makes it much smaller than a circle about the
    LV axis; only points inside it pay for the cardiac model.
    """
    cx, cy = heart_centre(heart, z)
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


def background_at(anat: Mapping[str, Any], x: np.ndarray, y: np.ndarray, z: float
                  ) -> np.ndarray:
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


def paint_heart(anat: Mapping[str, Any], x: np.ndarray, y: np.ndarray, z: float,
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
    bx, by, radius = heart_bounds(heart, z)
    x, y = np.ravel(x), np.ravel(y)
    near = np.flatnonzero((x - bx) ** 2 + (y - by) ** 2 < radius**2)
    if near.size == 0:
        return
    cx, cy = heart_centre(heart, z)
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


def regions_at(anat: Mapping[str, Any], x: np.ndarray, y: np.ndarray, z: float) -> np.ndarray:
    """Region index of the whole model (chest, then the heart painted over it)."""
    out = background_at(anat, x, y, z)
    paint_heart(anat, x, y, z, out)
    return out
