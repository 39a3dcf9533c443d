"""Synthetic multi-sequence short-axis CMR cases: the framework's embedded default dataset.

Each case draws a chest and a pathology from the analytic model in
:mod:`datasets.phantom_anatomy`, per-sequence acquisition geometry (pixel size, field of view,
slice positions) and misalignment, then renders every sequence with
:mod:`datasets.phantom_render` (partial volume, slice profile, tissue contrast, coil bias,
Rician noise), as :class:`~datasets.phantom_config.PhantomConfig` says. This module holds the
geometry and misalignment draws, case generation and writing in the MyoPS380 layout.

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

from datasets.labels import MODALITIES
from datasets.misalignment import (
    apply_slice_misalignment,
    sample_slice_misalignment,
)
from datasets.phantom_anatomy import REGION_TISSUE, heart_centre, sample_anatomy, uniform
from datasets.phantom_config import PhantomConfig
from datasets.phantom_render import acquire, grid_axes, render
from datasets.raw import nifti_image
from utils import atomic_path, write_json

log = logging.getLogger(__name__)

REFERENCE = "LGE"
MISALIGNED: tuple[str, ...] = tuple(name for name in MODALITIES if name != REFERENCE)

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


@dataclass
class PhantomCase:
    """One generated case in memory; ``truth`` is JSON-able (see the module docstring)."""

    case_id: str
    images: dict[str, nib.Nifti1Image]
    label: nib.Nifti1Image
    truth: dict
    truth_labels: dict[str, nib.Nifti1Image]


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
        ny = max(1, round(config.fov_mm * uniform(rng, *config.phase_fov_fraction) / s))
        nz = int(rng.integers(geom.n_slices[0], geom.n_slices[1] + 1))
        dz = uniform(rng, *geom.slice_spacing_mm)
        centre = body_c + rng.uniform(-1, 1, 2) * config.fov_offset_mm
        z_centre = z_mid + uniform(rng, *base_shift.get(name, (0.0, 0.0)))
        z_centre += uniform(rng, -1, 1) * config.stack_offset_mm
        z_first = z_centre - (nz - 1) / 2 * dz
        if config.planned_from_cine and name != "bSSFP":
            z_first, dz = _copy_cine_positions(sequences["bSSFP"], nz, z_centre)
            z_first += uniform(rng, -1, 1) * config.stack_offset_mm
        affine = np.diag([s, s, dz, 1.0])
        affine[:3, 3] = [centre[0] - (nx - 1) / 2 * s, centre[1] - (ny - 1) / 2 * s, z_first]
        slice_z = (affine[2, 3] + dz * np.arange(nz)).tolist()
        sequences[name] = {
            "shape": [nx, ny, nz], "affine": affine.tolist(), "spacing_mm": [s, s, dz],
            "slice_thickness_mm": geom.slice_thickness_mm, "fov_mm": [nx * s, ny * s],
            "fov_centre_mm": centre.tolist(), "slice_z_mm": slice_z,
            # LV axis point of every slice in the label (LGE) frame, before any misalignment.
            "heart_centre_mm": [[float(v) for v in heart_centre(anat["heart"], z)]
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


def _sample_misalignment(rng: np.random.Generator, config: PhantomConfig,
                         anat: Mapping[str, Any], seq: Mapping[str, Any]
                         ) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Per-slice similarity about the heart centre plus a smooth B-spline field (mm).

    Returns the JSON record and the dense displacement ``[2, nx, ny]`` of every slice, which the
    renderer reuses (it equals the recorded field to within the 1e-6 mm rounding).
    """
    xs, ys = grid_axes(seq)
    slices, fields = [], []
    for z in seq["slice_z_mm"]:
        record, field = sample_slice_misalignment(rng, heart_centre(anat["heart"], z), xs, ys,
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
    anat = sample_anatomy(anat_rng, config)
    sequences = _sample_geometry(geom_rng, config, anat)
    fields = {}
    for name in MISALIGNED:
        sequences[name]["misalignment"], fields[name] = _sample_misalignment(
            motion_rng, config, anat, sequences[name])
    images, labels = {}, {}
    for name in MODALITIES:
        seq = sequences[name]
        contrast = {tissue: value * (1 + uniform(acq_rng, -1, 1) * config.contrast_jitter)
                    for tissue, value in CONTRAST[name].items()}
        lut = np.array([contrast[tissue] for tissue in REGION_TISSUE], np.float32)
        signal, codes = render(anat, seq, lut, config, fields.get(name))
        image, record = acquire(signal, seq, acq_rng, config)
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
