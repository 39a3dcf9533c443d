"""Three per-slice affine estimators that fail in unrelated ways, and running them together.

Used by the consensus registration (:mod:`preprocessing.consensus_affine`, their mean transform)
and by the reference-agreement measurement (:mod:`preprocessing.reference_agreement`, their
pairwise agreement).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from preprocessing.affine_registration import AffineRegistrationConfig, register_affine
from preprocessing.ngf_affine import NGFAffineConfig, register_affine_ngf
from preprocessing.transforms import Affine2D

#: ``estimator(fixed image, fixed myocardium, moving, metric masks)``, all ``[N, H, W]`` on one
#: grid -> one transform per slice, fixed pixels ``(row, col)`` -> moving ones.
Estimator = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], Sequence[Affine2D]]


def independent_estimators(bounds: AffineRegistrationConfig | None = None,
                           ngf: NGFAffineConfig | None = None) -> dict[str, Estimator]:
    """Three heart-offset estimators that fail in unrelated ways: NGF (edge directions) to the
    fixed image, NGF to the label's myocardium, and Mattes mutual information (intensity
    statistics, SimpleITK) to the fixed image.

    The NGF fits run without their prior (by default ``prior_weight=0, min_gain=0``): a prior
    pulls every fit toward the identity, which shrinks the offsets and hides the common part.
    """
    bounds = bounds or AffineRegistrationConfig()
    ngf = ngf or NGFAffineConfig(prior_weight=0.0, min_gain=0.0)

    def ngf_image(fixed, myocardium, moving, masks):
        return [r.transform for r in register_affine_ngf(fixed, moving, masks, ngf, bounds)]

    def ngf_label(fixed, myocardium, moving, masks):
        contours = np.stack([ndimage.gaussian_filter(m.astype(np.float32) * 255.0, 1.0)
                             for m in myocardium])
        return [r.transform for r in register_affine_ngf(contours, moving, masks, ngf, bounds)]

    def mutual_information(fixed, myocardium, moving, masks):
        return [register_affine(f, m, k, bounds).transform
                for f, m, k in zip(fixed, moving, masks, strict=True)]

    return {"NGF to image": ngf_image, "NGF to label": ngf_label,
            "MI to image": mutual_information}


def reference_transforms(fixed: np.ndarray, myocardium: np.ndarray, moving: np.ndarray,
                         masks: np.ndarray, estimators: Mapping[str, Estimator],
                         ) -> dict[str, Sequence[Affine2D]]:
    """Every estimator's per-slice fit of ``moving`` onto the reference alignment."""
    return {name: estimate(fixed, myocardium, moving, masks)
            for name, estimate in estimators.items()}
