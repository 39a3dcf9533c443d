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

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from datasets.labels import MODALITIES
from datasets.raw import RawCase
from preprocessing.affine_registration import (
    AffineRegistrationConfig,
    AffineResult,
    myocardium_metric_mask,
    register_affine,
)
from preprocessing.consensus_affine import register_affine_consensus
from preprocessing.intensity import apply_window, normalise_to_255
from preprocessing.mask_affine import MaskAffineConfig, register_masks
from preprocessing.ngf_affine import NGFAffineConfig, register_affine_ngf
from preprocessing.resample import PlaneGrid, sample_slice
from preprocessing.slice_matching import SliceMatch, choose_reference, match_slices
from preprocessing.transforms import Affine2D, compose_fields, identity_field

if TYPE_CHECKING:
    import torch

    from preprocessing.voxelmorph import VoxelMorph2D


AFFINE_METRICS: tuple[str, ...] = ("ngf", "mattes", "consensus", "segmentation")
#: ``segmenter(stack [D, H, W] in [0, 255], sequence) -> myocardium probability [D, H, W]``
Segmenter = Callable[[np.ndarray, str], np.ndarray]


@dataclass(frozen=True)
class PreprocessConfig:
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
        if self.pixel_spacing_mm <= 0:
            raise ValueError(f"pixel_spacing_mm must be > 0, got {self.pixel_spacing_mm}")
        if not 0 < self.roi_size <= self.crop_size:
            raise ValueError(f"need 0 < roi_size <= crop_size, got {self.roi_size}, "
                             f"{self.crop_size}")
        if self.max_slice_distance_mm <= 0:
            raise ValueError("max_slice_distance_mm must be > 0")
        if not 0 <= self.low_percentile < self.high_percentile <= 100:
            raise ValueError("percentiles must satisfy 0 <= low < high <= 100")
        if self.affine.pixel_spacing_mm != self.pixel_spacing_mm:
            raise ValueError("affine.pixel_spacing_mm must equal pixel_spacing_mm")

    def to_dict(self) -> dict:
        return asdict(self)


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

    @property
    def moving(self) -> tuple[str, ...]:
        return tuple(name for name in MODALITIES if name != self.fixed)

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
    partners = {name: [int(m.partner[k]) for k in kept] for name, m in matches.items()}
    grids = [PlaneGrid.centred_on_slice(ref_volume, k, config.crop_size, config.pixel_spacing_mm)
             for k in kept]

    def resample(name: str, fields: list[np.ndarray] | None = None) -> np.ndarray:
        return np.stack([
            sample_slice(volumes[name], partners[name][i], grid, is_label=False,
                         field=None if fields is None else fields[i])
            for i, grid in enumerate(grids)])

    full = {name: resample(name) for name in MODALITIES}
    label_full = np.stack([
        sample_slice(case.label, partners[case.label_modality][i], grid, is_label=True)
        for i, grid in enumerate(grids)])
    windows = {}
    for name in MODALITIES:
        full[name], windows[name] = normalise_to_255(
            full[name], config.low_percentile, config.high_percentile,
            source=str(volumes[name].source))

    row0, col0 = roi_origin(label_full, config.roi_size, case.case_id)
    roi = (slice(None), slice(row0, row0 + config.roi_size), slice(col0, col0 + config.roi_size))
    roi_field = identity_field((config.roi_size, config.roi_size)) + np.array(
        [row0, col0], dtype=np.float64)[:, None, None]

    fixed = case.label_modality
    masks = [myocardium_metric_mask(label, config.affine.mask_margin_mm, config.pixel_spacing_mm)
             for label in label_full]
    affine_fields = {name: [roi_field] * len(kept) for name in MODALITIES}
    registrations: dict[str, list[dict]] = {}
    if config.affine_registration:
        for name in MODALITIES:
            if name == fixed:
                continue
            if config.affine_metric == "ngf":
                results = register_affine_ngf(full[fixed], full[name], np.stack(masks),
                                              config.ngf, config.affine)
            elif config.affine_metric == "consensus":
                results = register_affine_consensus(full[fixed], label_full > 0, full[name],
                                                    np.stack(masks), config.affine, config.ngf)
            elif config.affine_metric == "segmentation":
                results = _segmentation_fit(full[name][roi], label_full[roi], name, (row0, col0),
                                            segmenter, config)
            else:
                results = [register_affine(full[fixed][i], full[name][i], masks[i],
                                           config.affine) for i in range(len(kept))]
            registrations[name] = [result.to_dict() for result in results]
            affine_fields[name] = [result.transform.map_field(roi_field) for result in results]

    images = {}
    for name in MODALITIES:
        if name in registrations:
            stack = apply_window(resample(name, affine_fields[name]), windows[name])
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
        "reference_slices_dropped": [k for k in range(ref_volume.num_slices) if k not in kept],
        "matched_slices": partners,
        "match_distance_mm": _distances(matches, kept),
        "grids": [grid.to_dict() for grid in grids],
        "roi": {"row0": row0, "col0": col0, "size": config.roi_size},
        "intensity_window": windows,
        "affine_registration": registrations,
        "affine_segmenter": (_describe(segmenter) if config.affine_registration
                             and config.affine_metric == "segmentation" else None),
        "output_spacing": (ref_volume.spacing[0], config.pixel_spacing_mm,
                           config.pixel_spacing_mm),
        "num_slices": len(kept),
    }
    return AlignedCase(case.case_id, fixed, grids, partners, (row0, col0),
                       np.ascontiguousarray(label_full[roi]), windows, affine_fields, images,
                       {name: np.ascontiguousarray(full[name][roi]) for name in MODALITIES},
                       manifest)


def _describe(segmenter: Segmenter) -> dict | str:
    describe = getattr(segmenter, "describe", None)
    return describe() if callable(describe) else type(segmenter).__qualname__


def _segmentation_fit(moving_roi: np.ndarray, label_roi: np.ndarray, name: str,
                      origin: tuple[int, int], segmenter: Segmenter,
                      config: PreprocessConfig) -> list[AffineResult]:
    """Register ``name``'s own predicted myocardium (ROI) onto the label's; full-grid results.

    The fit runs on the ROI; a transform ``q -> M q + b`` of ROI pixels is, on the full grid,
    ``q -> M (q - o) + b + o`` with ``o`` the ROI origin.
    """
    myocardium = segmenter(moving_roi, name)
    if myocardium.shape != label_roi.shape:
        raise ValueError(f"segmenter returned {myocardium.shape} for {name}'s "
                         f"{label_roi.shape} ROI stack")
    o = np.asarray(origin, dtype=np.float64)
    results = register_masks(label_roi, myocardium, config.mask_fit, config.affine)
    return [replace(result, transform=Affine2D(
        result.transform.matrix, result.transform.offset + o - result.transform.matrix @ o))
        for result in results]


def finish_case(case: RawCase, aligned: AlignedCase, config: PreprocessConfig,
                voxelmorph: VoxelMorph2D | None = None,
                device: torch.device | None = None) -> ProcessedCase:
    """Step 4 (when a model is given) and the single final resampling of every sequence."""
    fields = {name: list(aligned.affine_fields[name]) for name in MODALITIES}
    nonrigid: dict[str, list[float]] = {}
    if voxelmorph is not None:
        from preprocessing.voxelmorph import predict_field

        for name in aligned.moving:
            magnitudes = []
            for i in range(len(aligned.grids)):
                local = predict_field(voxelmorph, aligned.images[aligned.fixed][i],
                                      aligned.images[name][i], device)
                shift = local - identity_field(local.shape[1:])
                magnitudes.append(float(np.hypot(*shift).max()))
                fields[name][i] = compose_fields(local, aligned.affine_fields[name][i])
            nonrigid[name] = magnitudes
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


def preprocess_case(case: RawCase, config: PreprocessConfig | None = None,
                    voxelmorph: VoxelMorph2D | None = None,
                    device: torch.device | None = None,
                    segmenter: Segmenter | None = None) -> ProcessedCase:
    """All steps for one case (non-rigid only when a trained model is given)."""
    config = config or PreprocessConfig()
    return finish_case(case, align_case(case, config, segmenter), config, voxelmorph, device)


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


def _distances(matches: dict[str, SliceMatch], kept: list[int]) -> dict[str, list[float]]:
    return {name: [match.distance_mm[k] for k in kept] for name, match in matches.items()}
