"""Per-case preprocessing: match slices, resample to 1 mm, normalise, crop the heart ROI.

This is the first half of the seed pipeline (steps 1, 2 and 5); the registration steps slot in
between resampling and the ROI crop. Everything a later stage needs to map predictions back to the
native images (matched slices, grids, crop box, intensity windows) goes into the case manifest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from datasets.labels import MODALITIES
from datasets.raw import RawCase
from preprocessing.intensity import normalise_to_255
from preprocessing.resample import PlaneGrid, sample_slice
from preprocessing.slice_matching import choose_reference, match_slices


@dataclass(frozen=True)
class PreprocessConfig:
    """Geometry and intensity settings of the pipeline (defaults follow the seed)."""

    pixel_spacing_mm: float = 1.0
    crop_size: int = 224
    roi_size: int = 128
    max_slice_distance_mm: float = 5.0
    low_percentile: float = 0.5
    high_percentile: float = 99.5
    modalities: tuple[str, ...] = MODALITIES

    def __post_init__(self) -> None:
        if self.pixel_spacing_mm <= 0:
            raise ValueError(f"pixel_spacing_mm must be > 0, got {self.pixel_spacing_mm}")
        if not 0 < self.roi_size <= self.crop_size:
            raise ValueError(f"need 0 < roi_size <= crop_size, got {self.roi_size}, "
                             f"{self.crop_size}")
        if self.max_slice_distance_mm <= 0:
            raise ValueError("max_slice_distance_mm must be > 0")
        if not 0 <= self.low_percentile < self.high_percentile <= 100:
            raise ValueError("percentiles must satisfy 0 <= low < high <= 100")
        if set(self.modalities) != set(MODALITIES):
            raise ValueError(f"modalities must be {MODALITIES}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ProcessedCase:
    """Aligned ``[D, roi, roi]`` stacks per sequence in [0, 255], the label and a manifest."""

    case_id: str
    images: dict[str, np.ndarray]
    label: np.ndarray
    spacing: tuple[float, float, float]
    manifest: dict = field(default_factory=dict)


def preprocess_case(case: RawCase, config: PreprocessConfig = PreprocessConfig()) -> ProcessedCase:
    """Run the geometric and intensity steps on one loaded case."""
    if case.label is None or case.label_modality is None:
        raise ValueError(f"{case.case_id}: preprocessing for training needs a label")
    volumes = dict(case.images)
    reference = choose_reference(volumes, prefer=case.label_modality)
    ref_volume = volumes[reference]

    matches = {name: match_slices(ref_volume, volume, config.max_slice_distance_mm)
               for name, volume in volumes.items()}
    kept = [k for k in range(ref_volume.num_slices)
            if all(match.partner[k] is not None for match in matches.values())]
    if not kept:
        raise ValueError(
            f"{case.case_id}: no reference ({reference}) slice has a partner within "
            f"{config.max_slice_distance_mm} mm in every sequence; distances "
            f"{ {n: [round(d, 1) for d in m.distance_mm] for n, m in matches.items()} }")

    grids = [PlaneGrid.centred_on_slice(ref_volume, k, config.crop_size, config.pixel_spacing_mm)
             for k in kept]
    resampled = {
        name: np.stack([sample_slice(volumes[name], matches[name].partner[k], grid,
                                     is_label=False)
                        for k, grid in zip(kept, grids, strict=True)])
        for name in config.modalities
    }
    label_match = matches[case.label_modality]
    label = np.stack([sample_slice(case.label, label_match.partner[k], grid, is_label=True)
                      for k, grid in zip(kept, grids, strict=True)])

    windows = {}
    for name in config.modalities:
        resampled[name], windows[name] = normalise_to_255(
            resampled[name], config.low_percentile, config.high_percentile,
            source=str(volumes[name].source))

    row0, col0 = roi_origin(label, config.roi_size, case.case_id)
    window = (slice(None), slice(row0, row0 + config.roi_size), slice(col0, col0 + config.roi_size))
    images = {name: np.ascontiguousarray(stack[window]) for name, stack in resampled.items()}
    label = np.ascontiguousarray(label[window])

    spacing = (ref_volume.spacing[0], config.pixel_spacing_mm, config.pixel_spacing_mm)
    manifest = {
        "case_id": case.case_id,
        "config": config.to_dict(),
        "sources": {name: str(v.source) for name, v in volumes.items()}
        | {"label": str(case.label.source)},
        "native_spacing": {name: v.spacing for name, v in volumes.items()},
        "reference": reference,
        "label_modality": case.label_modality,
        "reference_slices_kept": kept,
        "reference_slices_dropped": [k for k in range(ref_volume.num_slices) if k not in kept],
        "matched_slices": {name: [m.partner[k] for k in kept] for name, m in matches.items()},
        "match_distance_mm": {name: [m.distance_mm[k] for k in kept]
                              for name, m in matches.items()},
        "grids": [grid.to_dict() for grid in grids],
        "roi": {"row0": row0, "col0": col0, "size": config.roi_size},
        "intensity_window": windows,
        "output_spacing": spacing,
        "num_slices": len(kept),
    }
    return ProcessedCase(case.case_id, images, label, spacing, manifest)


def roi_origin(label: np.ndarray, size: int, case_id: str) -> tuple[int, int]:
    """Top-left corner of a ``size`` box centred on the myocardium centroid, kept inside."""
    foreground = np.argwhere(label > 0)
    if foreground.size == 0:
        raise ValueError(f"{case_id}: no myocardium in the matched slices; cannot place the ROI")
    _, centre_row, centre_col = foreground.mean(axis=0)
    height, width = label.shape[1:]
    row0 = int(np.clip(round(centre_row - size / 2), 0, height - size))
    col0 = int(np.clip(round(centre_col - size / 2), 0, width - size))
    return row0, col0
