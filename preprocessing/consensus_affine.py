"""Consensus affine registration: the mean of three independent fits per slice.

On real slices each registration metric's own noise (1.7-2.8 mm rms of the myocardium's
offset, see :mod:`preprocessing.reference_agreement`) is larger than what the metrics share, and
the noises of NGF to the fixed image, NGF to the label's myocardium and Mattes MI are largely
independent. Their mean transform therefore lands closer to what the images show than any one
of them. It costs the three fits (about 4 s per case). Where one metric fails outright (NGF to
the label on the phantom's contrasts) the mean is worse than the better single metric.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import replace

import numpy as np

from preprocessing.affine_estimators import (
    Estimator,
    independent_estimators,
    reference_transforms,
)
from preprocessing.affine_registration import (
    AffineRegistrationConfig,
    AffineResult,
    check_slice_inputs,
    implausibility,
)
from preprocessing.ngf_affine import NGFAffineConfig, mask_geometry
from preprocessing.transforms import Affine2D


def register_affine_consensus(fixed: np.ndarray, myocardium: np.ndarray, moving: np.ndarray,
                              masks: np.ndarray,
                              bounds: AffineRegistrationConfig | None = None,
                              ngf: NGFAffineConfig | None = None,
                              estimators: Mapping[str, Estimator] | None = None,
                              ) -> list[AffineResult]:
    """Fit every slice ``fixed[i] -> moving[i]`` (``[N, H, W]``, one 1 mm grid) by the mean of
    the ``estimators``' transforms (default :func:`independent_estimators`, NGF without its
    prior so that each fit follows its own evidence).

    ``myocardium`` is the label's myocardium on the fixed grid, ``masks`` the metric masks. A
    mean outside the plausibility ``bounds`` falls back to the identity, with the reason.
    """
    start = time.perf_counter()
    bounds = bounds or AffineRegistrationConfig()
    fixed, moving, masks = check_slice_inputs(fixed, moving, masks, stacked=True,
                                              mask_name="masks")
    myocardium = np.asarray(myocardium, bool)
    if myocardium.shape != fixed.shape:
        raise ValueError(f"myocardium {myocardium.shape} does not match the slices "
                         f"{fixed.shape}")
    if estimators is None:
        ngf = replace(ngf or NGFAffineConfig(), prior_weight=0.0, min_gain=0.0)
        estimators = independent_estimators(bounds, ngf)
    fits = reference_transforms(fixed, myocardium, moving, masks, estimators)
    centres, _ = mask_geometry(masks, bounds.pixel_spacing_mm)
    seconds = (time.perf_counter() - start) / max(len(fixed), 1)
    results = []
    for i in range(len(fixed)):
        transform = Affine2D(np.mean([fit[i].matrix for fit in fits.values()], axis=0),
                             np.mean([fit[i].offset for fit in fits.values()], axis=0))
        if int(masks[i].sum()) < bounds.min_mask_pixels:
            reason = f"fixed mask has {int(masks[i].sum())} < {bounds.min_mask_pixels} pixels"
        else:
            reason = implausibility(transform, centres[i], bounds)
        fallbacks = () if reason is None else (f"consensus: {reason}",)
        results.append(AffineResult(Affine2D.identity() if reason else transform,
                                    "identity" if reason else "affine", math.nan, math.nan,
                                    seconds, "affine", fallbacks))
    return results
