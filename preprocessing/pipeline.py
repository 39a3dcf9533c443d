"""Per-case preprocessing: the five steps of the seed pipeline.

1. slice correspondence from world positions (:mod:`preprocessing.slice_matching`);
2. resampling to a 1 mm grid in the reference slice plane, centre crop, percentile normalisation;
3. slice-wise, myocardium-guided affine registration of bSSFP and T2w onto the labelled sequence;
4. VoxelMorph-style non-rigid registration on heart-centred crops (model trained on the data's own
   pairs; see :mod:`preprocessing.runner`);
5. 128x128 ROI crop around the myocardium.

Registration results are sampling fields on the reference grid, composed and applied to the
native slices in one interpolation. The case is handled in two stages, :func:`align_case`
(steps 1-3 and the ROI) and :func:`finish_case` (step 4 and the final resampling), because the
non-rigid network is trained on the aligned pairs of all cases in between. Everything needed to
map predictions back to the native images goes into the manifest and the fields file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from datasets.labels import MODALITIES
from datasets.raw import RawCase, Volume
from preprocessing.affine_registration import myocardium_metric_mask
from preprocessing.config import AFFINE_METRICS, PreprocessConfig
from preprocessing.grid_stacks import PREFERRED_REFERENCE, GridStacks, resample_to_grids
from preprocessing.intensity import apply_window
from preprocessing.registration import Segmenter, affine_fits, nonrigid_fields, roi_field
from preprocessing.resample import PlaneGrid, sample_slice

if TYPE_CHECKING:
    import torch

    from preprocessing.voxelmorph_net import VoxelMorph2D

__all__ = ["AFFINE_METRICS", "AlignedCase", "NoMyocardiumError", "PreprocessConfig",
           "ProcessedCase", "Segmenter", "align_case", "finish_case", "grid_stacks",
           "preprocess_case", "roi_origin"]


@dataclass
class AlignedCase:
    """A case after steps 1-3: everything on the reference grid, still without non-rigid fields.

    ``affine_fields[name][k]`` maps ROI pixels to positions on slice ``k``'s 224 grid of sequence
    ``name``; ``images`` are the ROI stacks resampled through them (normalised), which pair up for
    non-rigid registration.
    """

    case_id: str
    fixed: str
    grids: list[PlaneGrid]
    partners: dict[str, list[int]]
    roi: tuple[int, int]
    label: np.ndarray
    windows: dict[str, tuple[float, float]]
    affine_fields: dict[str, list[np.ndarray]]
    images: dict[str, np.ndarray]
    unregistered: dict[str, np.ndarray]
    manifest: dict
    #: the sequences the case has (the others are zero stacks, never registered)
    present: tuple[str, ...] = MODALITIES

    @property
    def moving(self) -> tuple[str, ...]:
        return tuple(name for name in self.present if name != self.fixed)

    def metric_mask(self, margin_mm: float, spacing_mm: float) -> np.ndarray:
        """Dilated myocardium of every slice, ``[D, roi, roi]`` (where similarity counts)."""
        return np.stack([myocardium_metric_mask(label, margin_mm, spacing_mm)
                         for label in self.label])


@dataclass
class ProcessedCase:
    """Aligned ``[D, roi, roi]`` stacks per sequence in [0, 255], the label and a manifest.

    ``fields[name]`` is ``[D, 2, roi, roi]``: where each output pixel was sampled on the sequence's
    224 grid (step 2 coordinates), i.e. all registration composed; with the grids in the manifest
    it maps every output pixel back to native space.
    """

    case_id: str
    images: dict[str, np.ndarray]
    label: np.ndarray
    spacing: tuple[float, float, float]
    fields: dict[str, np.ndarray]
    manifest: dict = field(default_factory=dict)
    unregistered: dict[str, np.ndarray] = field(default_factory=dict)


def align_case(case: RawCase, config: PreprocessConfig,
               segmenter: Segmenter | None = None) -> AlignedCase:
    """Steps 1-3 and the ROI placement for one loaded, labelled case.

    ``segmenter`` is required by, and only used with, ``affine_metric="segmentation"``.
    """
    if case.label is None or case.label_modality is None:
        raise ValueError(f"{case.case_id}: preprocessing for training needs a label")
    if (config.affine_registration and config.affine_metric == "segmentation"
            and segmenter is None):
        raise ValueError("affine_metric 'segmentation' needs a segmenter network "
                         "(preprocess_data.py --segmenter CHECKPOINT)")
    volumes = dict(case.images)
    stacks = grid_stacks(case.case_id, volumes, config, prefer=case.label_modality)
    reference, kept, partners, grids = (stacks.reference, list(stacks.kept), stacks.partners,
                                        stacks.grids)
    ref_volume = volumes[reference]
    full = {name: stacks.channel(name) for name in MODALITIES}
    label_full = stacks.label_on_grids(case.label, case.label_modality)
    windows = stacks.windows

    row0, col0 = roi_origin(label_full, config.roi_size, case.case_id)
    roi = (slice(None), slice(row0, row0 + config.roi_size), slice(col0, col0 + config.roi_size))

    fixed = case.label_modality
    base_field = roi_field((row0, col0), config.roi_size)
    affine_fields = {name: [base_field] * len(kept) for name in MODALITIES}
    registrations: dict[str, list[dict]] = {}
    poolings: dict[str, dict] = {}
    if config.affine_registration:
        for name in MODALITIES:
            if name == fixed or name not in stacks.present:
                continue
            results, poolings[name] = affine_fits(
                config.affine_metric, full[fixed], full[name], label_full, (row0, col0),
                config.roi_size, name, config.affine, config.ngf, config.mask_fit, segmenter,
                config.affine_pooling)
            registrations[name] = [result.to_dict() for result in results]
            affine_fields[name] = [result.transform.map_field(base_field) for result in results]

    images = {}
    for name in MODALITIES:
        if name in registrations:
            stack = stacks.resample(name, affine_fields[name])
        else:
            stack = full[name][roi]
        images[name] = np.ascontiguousarray(stack)

    manifest = {
        "case_id": case.case_id,
        "config": config.to_dict(),
        "sources": {name: str(v.source) for name, v in volumes.items()}
        | {"label": str(case.label.source)},
        "native_spacing": {name: v.spacing for name, v in volumes.items()},
        "reference": reference,
        "label_modality": fixed,
        "reference_slices_kept": kept,
        "reference_slices_dropped": list(stacks.dropped),
        "matched_slices": partners,
        "match_distance_mm": stacks.distances_mm,
        "grids": [grid.to_dict() for grid in grids],
        "roi": {"row0": row0, "col0": col0, "size": config.roi_size},
        "intensity_window": windows,
        "affine_registration": registrations,
        "affine_pooling": poolings,
        "affine_segmenter": (_describe(segmenter) if config.affine_registration
                             and config.affine_metric == "segmentation" else None),
        "output_spacing": (ref_volume.spacing[0], config.pixel_spacing_mm,
                           config.pixel_spacing_mm),
        "num_slices": len(kept),
        "present": list(stacks.present),
    }
    return AlignedCase(case.case_id, fixed, grids, partners, (row0, col0),
                       np.ascontiguousarray(label_full[roi]), windows, affine_fields, images,
                       {name: np.ascontiguousarray(full[name][roi]) for name in MODALITIES},
                       manifest, tuple(stacks.present))


def _describe(segmenter: Segmenter) -> dict | str:
    describe = getattr(segmenter, "describe", None)
    return describe() if callable(describe) else type(segmenter).__qualname__


def finish_case(case: RawCase, aligned: AlignedCase, config: PreprocessConfig,
                voxelmorph: VoxelMorph2D | None = None,
                device: torch.device | None = None) -> ProcessedCase:
    """Step 4 (when a model is given) and the single final resampling of every sequence."""
    fields = {name: list(aligned.affine_fields[name]) for name in MODALITIES}
    nonrigid: dict[str, list[float]] = {}
    if voxelmorph is not None:
        for name in aligned.moving:
            fields[name], nonrigid[name] = nonrigid_fields(
                voxelmorph, aligned.images[aligned.fixed], aligned.images[name],
                aligned.affine_fields[name], device)
    images = {}
    for name in MODALITIES:
        if name == aligned.fixed or name not in nonrigid:
            images[name] = aligned.images[name]
            continue
        stack = np.stack([
            sample_slice(case.images[name], aligned.partners[name][i], grid, is_label=False,
                         field=fields[name][i])
            for i, grid in enumerate(aligned.grids)])
        images[name] = np.ascontiguousarray(apply_window(stack, aligned.windows[name]))
    manifest = aligned.manifest | {"nonrigid_max_displacement_px": nonrigid}
    return ProcessedCase(
        aligned.case_id, images, aligned.label, tuple(manifest["output_spacing"]),
        {name: np.stack(fields[name]).astype(np.float32) for name in MODALITIES}, manifest,
        aligned.unregistered)


def grid_stacks(case_id: str, volumes: Mapping[str, Volume], config: PreprocessConfig,
                prefer: str | None = PREFERRED_REFERENCE) -> GridStacks:
    """Steps 1-2 for any subset of a case's sequences, label-free (:mod:`.grid_stacks`).

    Training cases pass their labelled sequence as ``prefer``; test volumes and new patients keep
    the default, so both see exactly the same inputs.
    """
    return resample_to_grids(case_id, volumes, config.crop_size, config.pixel_spacing_mm,
                             config.max_slice_distance_mm, config.low_percentile,
                             config.high_percentile, prefer=prefer or PREFERRED_REFERENCE)


def preprocess_case(case: RawCase, config: PreprocessConfig | None = None,
                    voxelmorph: VoxelMorph2D | None = None,
                    device: torch.device | None = None,
                    segmenter: Segmenter | None = None) -> ProcessedCase:
    """All steps for one case (non-rigid only when a trained model is given)."""
    config = config or PreprocessConfig()
    return finish_case(case, align_case(case, config, segmenter), config, voxelmorph, device)


class NoMyocardiumError(ValueError):
    """A training case's label has no myocardium on the matched slices (no ROI to place)."""


def roi_origin(label: np.ndarray, size: int, case_id: str) -> tuple[int, int]:
    """Top-left corner of a ``size`` box centred on the myocardium centroid, kept inside."""
    foreground = np.argwhere(label > 0)
    if foreground.size == 0:
        raise NoMyocardiumError(f"{case_id}: no myocardium in the matched slices; cannot place "
                                "the ROI")
    _, centre_row, centre_col = foreground.mean(axis=0)
    height, width = label.shape[1:]
    row0 = int(np.clip(round(centre_row - size / 2), 0, height - size))
    col0 = int(np.clip(round(centre_col - size / 2), 0, width - size))
    return row0, col0
