"""Consensus registration: the mean of the estimators' fits, with plausibility fallbacks."""

from __future__ import annotations

import numpy as np
import pytest

from preprocessing.affine_registration import AffineRegistrationConfig
from preprocessing.consensus_affine import register_affine_consensus
from preprocessing.transforms import Affine2D


def _slices(count=2, size=48):
    rng = np.random.default_rng(0)
    fixed = rng.uniform(0, 255, (count, size, size)).astype(np.float32)
    myocardium = np.zeros((count, size, size), bool)
    myocardium[:, 16:32, 16:32] = True
    masks = np.zeros_like(myocardium)
    masks[:, 8:40, 8:40] = True
    return fixed, myocardium, fixed.copy(), masks


def _fixed_fits(*per_estimator):
    """Stub estimators returning the given transform for every slice."""
    return {f"stub {k}": (lambda f, m, mv, k_, t=t: [t] * len(f))
            for k, t in enumerate(per_estimator)}


def test_the_result_is_the_mean_transform():
    fixed, myocardium, moving, masks = _slices()
    fits = [Affine2D.from_parameters(rotation_deg=r, translation=t, centre=(24, 24))
            for r, t in ((2.0, (1.0, 0.0)), (-1.0, (0.0, 3.0)), (2.0, (-1.0, 0.0)))]
    results = register_affine_consensus(fixed, myocardium, moving, masks,
                                        estimators=_fixed_fits(*fits))
    expected_matrix = np.mean([fit.matrix for fit in fits], axis=0)
    expected_offset = np.mean([fit.offset for fit in fits], axis=0)
    assert len(results) == 2
    for result in results:
        assert result.model == "affine" and result.fallbacks == ()
        assert result.transform.matrix == pytest.approx(expected_matrix)
        assert result.transform.offset == pytest.approx(expected_offset)


def test_an_implausible_mean_falls_back_to_the_identity():
    fixed, myocardium, moving, masks = _slices()
    far = Affine2D.from_parameters(translation=(30.0, 0.0))
    results = register_affine_consensus(fixed, myocardium, moving, masks,
                                        AffineRegistrationConfig(max_translation_mm=6.0),
                                        estimators=_fixed_fits(far, far, far))
    for result in results:
        assert result.model == "identity"
        assert result.transform.matrix == pytest.approx(np.eye(2))
        assert "heart shift 30.0 mm" in result.fallbacks[0]


def test_a_tiny_mask_gives_the_identity_and_shapes_must_match():
    fixed, myocardium, moving, masks = _slices()
    masks[1] = False
    masks[1, 20:22, 20:22] = True
    shift = Affine2D.from_parameters(translation=(1.0, 1.0))
    results = register_affine_consensus(fixed, myocardium, moving, masks,
                                        estimators=_fixed_fits(shift, shift, shift))
    assert results[0].model == "affine"
    assert results[1].model == "identity" and "4 < 64 pixels" in results[1].fallbacks[0]
    with pytest.raises(ValueError, match="myocardium"):
        register_affine_consensus(fixed, myocardium[:1], moving, masks,
                                  estimators=_fixed_fits(shift, shift, shift))
