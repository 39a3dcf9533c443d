"""One registration dispatch for training preprocessing, test volumes and new patients.

Every path that registers bSSFP/T2w onto the fixed sequence goes through this module:
:func:`affine_fits` (the one dispatch over ``PreprocessConfig.affine_metric``: same names, same
defaults, same plausibility fall-backs) and :func:`nonrigid_fields` (step 4). Training
preprocessing calls them in two stages, because the non-rigid network is trained in between;
:func:`register_sequences` chains them for the label-free path. The only thing that differs
between the paths is where the *myocardium* comes from:

* training cases: the label (allowed: a training label shapes training inputs only);
* test volumes and new patients: the network's own first-pass prediction on the ROI, never a
  label (:mod:`prediction.pipeline`).

That myocardium gives the metric mask (dilated, cavity filled), the fixed image of the consensus
member "NGF to the myocardium", and the target of the segmentation-guided fit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from datasets.labels import MODALITIES
from preprocessing.affine_pooling import pool_affine_fits
from preprocessing.affine_registration import (
    AffineRegistrationConfig,
    AffineResult,
    myocardium_metric_mask,
    register_affine,
)
from preprocessing.config import AFFINE_METRICS, PreprocessConfig
from preprocessing.consensus_affine import register_affine_consensus
from preprocessing.grid_stacks import GridStacks
from preprocessing.mask_affine import MaskAffineConfig, register_masks
from preprocessing.ngf_affine import NGFAffineConfig, register_affine_ngf
from preprocessing.transforms import Affine2D, compose_fields, identity_field

if TYPE_CHECKING:
    import torch

    from preprocessing.voxelmorph_net import VoxelMorph2D

#: ``segmenter(stack [D, H, W] in [0, 255], sequence) -> myocardium probability [D, H, W]``
Segmenter = Callable[[np.ndarray, str], np.ndarray]


@dataclass
class Registered:
    """Per moving sequence: sampling fields ``[2, roi, roi]`` per slice (ROI pixel -> position
    on that sequence's full grid), the affine fit records and the non-rigid displacements."""

    fields: dict[str, list[np.ndarray]]
    affine: dict[str, list[dict]]
    nonrigid_max_px: dict[str, list[float]]
    pooling: dict[str, dict] = field(default_factory=dict)


def roi_field(origin: tuple[int, int], size: int) -> np.ndarray:
    """``[2, size, size]`` grid positions of the ROI pixels at ``origin`` (no registration)."""
    return identity_field((size, size)) + np.array(origin, dtype=np.float64)[:, None, None]


def metric_masks(myocardium: np.ndarray, margin_mm: float, spacing_mm: float) -> np.ndarray:
    """Dilated, filled myocardium of every slice of ``[D, H, W]``: where similarity counts."""
    return np.stack([myocardium_metric_mask(slice_, margin_mm, spacing_mm)
                     for slice_ in np.asarray(myocardium)])


def affine_fits(metric: str, fixed: np.ndarray, moving: np.ndarray, myocardium: np.ndarray,
                origin: tuple[int, int], roi_size: int, sequence: str,
                bounds: AffineRegistrationConfig, ngf: NGFAffineConfig,
                mask_fit: MaskAffineConfig, segmenter: Segmenter | None = None,
                pooling: str = "slice") -> tuple[list[AffineResult], dict]:
    """Fit every slice ``fixed[i] -> moving[i]`` (``[D, H, W]`` full grids, [0, 255]), then pool
    the fits over the stack (:mod:`preprocessing.affine_pooling`); the fits and the pooling
    record.

    ``myocardium [D, H, W]`` (labels or a prediction, > 0 is myocardium) sits on the fixed grid;
    the ROI at ``origin`` is where the segmentation-guided fit compares masks.
    """
    fits = _slice_fits(metric, fixed, moving, myocardium, origin, roi_size, sequence, bounds,
                       ngf, mask_fit, segmenter)
    return pool_affine_fits(fits, myocardium, pooling, bounds.pixel_spacing_mm)


def _slice_fits(metric: str, fixed: np.ndarray, moving: np.ndarray, myocardium: np.ndarray,
                origin: tuple[int, int], roi_size: int, sequence: str,
                bounds: AffineRegistrationConfig, ngf: NGFAffineConfig,
                mask_fit: MaskAffineConfig, segmenter: Segmenter | None
                ) -> list[AffineResult]:
    """Each slice fitted on its own by ``metric``."""
    if metric not in AFFINE_METRICS:
        raise ValueError(f"affine_metric must be one of {AFFINE_METRICS}, got {metric!r}")
    myocardium = np.asarray(myocardium)
    masks = metric_masks(myocardium, bounds.mask_margin_mm, bounds.pixel_spacing_mm)
    if metric == "ngf":
        return register_affine_ngf(fixed, moving, masks, ngf, bounds)
    if metric == "consensus":
        return register_affine_consensus(fixed, myocardium > 0, moving, masks, bounds, ngf)
    if metric == "segmentation":
        if segmenter is None:
            raise ValueError("affine_metric 'segmentation' needs a segmenter network "
                             "(--segmenter CHECKPOINT)")
        row0, col0 = origin
        roi = (slice(None), slice(row0, row0 + roi_size), slice(col0, col0 + roi_size))
        return _segmentation_fit(moving[roi], myocardium[roi], sequence, origin, segmenter,
                                 bounds, mask_fit)
    return [register_affine(fixed[i], moving[i], masks[i], bounds) for i in range(len(fixed))]


def _segmentation_fit(moving_roi: np.ndarray, myocardium_roi: np.ndarray, name: str,
                      origin: tuple[int, int], segmenter: Segmenter,
                      bounds: AffineRegistrationConfig, mask_fit: MaskAffineConfig
                      ) -> list[AffineResult]:
    """Register ``name``'s own predicted myocardium (ROI) onto the fixed one; full-grid results.

    The fit runs on the ROI; a transform ``q -> M q + b`` of ROI pixels is, on the full grid,
    ``q -> M (q - o) + b + o`` with ``o`` the ROI origin.
    """
    predicted = segmenter(moving_roi, name)
    if predicted.shape != myocardium_roi.shape:
        raise ValueError(f"segmenter returned {predicted.shape} for {name}'s "
                         f"{myocardium_roi.shape} ROI stack")
    o = np.asarray(origin, dtype=np.float64)
    results = register_masks(myocardium_roi, predicted, mask_fit, bounds)
    return [replace(result, transform=Affine2D(
        result.transform.matrix, result.transform.offset + o - result.transform.matrix @ o))
        for result in results]


def nonrigid_fields(model: VoxelMorph2D, fixed_roi: np.ndarray, moving_roi: np.ndarray,
                    affine_fields: list[np.ndarray], device: torch.device | None
                    ) -> tuple[list[np.ndarray], list[float]]:
    """Step 4: the non-rigid field of every ROI pair composed with its affine field.

    ``fixed_roi`` and ``moving_roi`` are ``[D, roi, roi]`` after the affine step. Returns the
    composed fields and each slice's largest displacement (px).
    """
    from preprocessing.voxelmorph import predict_field

    fields, magnitudes = [], []
    for i, affine_field in enumerate(affine_fields):
        local = predict_field(model, fixed_roi[i], moving_roi[i], device or "cpu")
        shift = local - identity_field(local.shape[1:])
        magnitudes.append(float(np.hypot(*shift).max()))
        fields.append(compose_fields(local, affine_field))
    return fields, magnitudes


def register_sequences(stacks: GridStacks, fixed: str, myocardium: np.ndarray,
                       origin: tuple[int, int], config: PreprocessConfig, *,
                       segmenter: Segmenter | None = None,
                       voxelmorph: VoxelMorph2D | None = None,
                       device: torch.device | None = None) -> tuple[np.ndarray, Registered]:
    """The ROI ``[D, S, roi, roi]`` at ``origin`` with every other given sequence registered
    onto ``fixed``: the affine step when ``config`` has it, then the non-rigid step when a
    ``voxelmorph`` network is given; each sequence is sampled once through the composed fields.

    ``myocardium [D, crop, crop]`` (> 0 is myocardium) is what guides the fit: on test volumes
    and new patients the network's first-pass prediction.
    """
    size = config.roi_size
    base = roi_field(origin, size)
    images = stacks.roi(origin, size)
    fixed_channel = MODALITIES.index(fixed)
    result = Registered({}, {}, {})
    for name in stacks.present:
        if name == fixed:
            continue
        fields = [base] * stacks.depth
        if config.affine_registration:
            fits, result.pooling[name] = affine_fits(
                config.affine_metric, stacks.channel(fixed), stacks.channel(name), myocardium,
                origin, size, name, config.affine, config.ngf, config.mask_fit, segmenter,
                config.affine_pooling)
            fields = [fit.transform.map_field(base) for fit in fits]
            result.affine[name] = [fit.to_dict() for fit in fits]
        if voxelmorph is not None:
            moved = stacks.resample(name, fields)
            fields, result.nonrigid_max_px[name] = nonrigid_fields(
                voxelmorph, images[:, fixed_channel], moved, fields, device)
        if config.affine_registration or voxelmorph is not None:
            images[:, MODALITIES.index(name)] = stacks.resample(name, fields)
        result.fields[name] = fields
    return images, result
