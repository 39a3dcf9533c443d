"""NGF affine fit: known transforms recovered on single- and cross-contrast pairs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from preprocessing.affine_registration import myocardium_metric_mask
from preprocessing.ngf_affine import NGFAffineConfig, register_affine_ngf
from preprocessing.transforms import Affine2D


def _heart(shape=(96, 96), centre=(48.0, 46.0)) -> tuple[np.ndarray, np.ndarray]:
    """A ring of myocardium (label) and an image with a bright pool, dark wall, grey outside."""
    rows, cols = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    radius = np.hypot((rows - centre[0]) / 1.0, (cols - centre[1]) / 1.15)
    label = ((radius > 12) & (radius < 20)).astype(np.uint8)
    image = np.where(radius <= 12, 220.0, np.where(radius < 20, 60.0, 130.0))
    # An RV-like pool beside the wall and a papillary muscle break the ring's symmetry, as in
    # a real short-axis slice; without them rotation would be unobservable.
    image[38:60, 12:22] = 240.0
    image[np.hypot(rows - 42, cols - 52) < 3] = 60.0
    return ndimage.gaussian_filter(image, 1.0).astype(np.float32), label


def _moving(image: np.ndarray, transform: Affine2D) -> np.ndarray:
    """The image whose content at ``transform(p)`` is ``image`` at ``p``."""
    return ndimage.map_coordinates(image, transform.inverse().field(image.shape), order=1,
                                   mode="nearest").astype(np.float32)


def _error_mm(found: Affine2D, truth: Affine2D, label: np.ndarray) -> float:
    points = np.argwhere(label > 0).astype(np.float64)
    return float(np.linalg.norm(found.apply(points) - truth.apply(points), axis=1).mean())


@pytest.mark.parametrize("invert_contrast", [False, True])
def test_recovers_a_known_affine(invert_contrast):
    fixed, label = _heart()
    truth = Affine2D.from_parameters(rotation_deg=4.0, scale=1.03, translation=(2.5, -3.0),
                                     centre=(48.0, 46.0))
    source = 255.0 - fixed if invert_contrast else fixed  # NGF ignores edge polarity
    moving = _moving(source, truth)
    mask = myocardium_metric_mask(label, 8.0)
    [result] = register_affine_ngf(fixed[None], moving[None], mask[None])
    assert result.model == "affine", result.fallbacks
    before = _error_mm(Affine2D.identity(), truth, label)
    assert before > 3.0
    assert _error_mm(result.transform, truth, label) < 0.5
    assert result.metric_after < result.metric_before


def test_aligned_pair_stays_put_and_batches_are_independent():
    fixed, label = _heart()
    mask = myocardium_metric_mask(label, 8.0)
    shifted = Affine2D(np.eye(2), np.array([3.0, 2.0]))
    stack = np.stack([fixed, fixed])
    moving = np.stack([fixed, _moving(fixed, shifted)])
    results = register_affine_ngf(stack, moving, np.stack([mask, mask]))
    assert _error_mm(results[0].transform, Affine2D.identity(), label) < 0.2
    assert _error_mm(results[1].transform, shifted, label) < 0.3


def test_empty_mask_and_flat_image_fall_back_to_identity():
    fixed, label = _heart()
    empty = np.zeros_like(label, dtype=bool)
    flat = np.full_like(fixed, 100.0)
    results = register_affine_ngf(np.stack([fixed, fixed]), np.stack([fixed, flat]),
                                  np.stack([empty, myocardium_metric_mask(label, 8.0)]))
    for result in results:
        assert result.model == "identity" and result.fallbacks
        np.testing.assert_allclose(result.transform.matrix, np.eye(2))


def test_bad_inputs_raise():
    fixed, label = _heart()
    mask = myocardium_metric_mask(label, 8.0)
    with pytest.raises(ValueError, match="one grid"):
        register_affine_ngf(fixed[None], fixed[None, :-1], mask[None])
    with pytest.raises(ValueError, match="boolean"):
        register_affine_ngf(fixed[None], fixed[None], label[None])
    bad = fixed.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        register_affine_ngf(bad[None], fixed[None], mask[None])
    with pytest.raises(ValueError, match="model"):
        NGFAffineConfig(model="bspline")
    with pytest.raises(ValueError, match="per pyramid level"):
        NGFAffineConfig(iterations=(10,))
