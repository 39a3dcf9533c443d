"""Segmentation-guided affine fit: known transforms are recovered, failures fall back."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from preprocessing.mask_affine import MaskAffineConfig, register_masks
from preprocessing.transforms import Affine2D

SIZE = 96


def _ring(centre=(48.0, 46.0), inner=12.0, outer=20.0) -> np.ndarray:
    rows, cols = np.mgrid[:SIZE, :SIZE].astype(float)
    # A slightly elliptic ring with a thicker wall on one side, so rotations are observable.
    radius = np.hypot((rows - centre[0]) * 1.15, cols - centre[1])
    thick = outer + 3 * (cols > centre[1])
    return ((radius >= inner) & (radius <= thick)).astype(np.uint8)


def _moving(label: np.ndarray, transform: Affine2D) -> np.ndarray:
    """The map whose point ``T(p)`` shows the label's point ``p`` (bilinear, in [0, 1])."""
    inverse = np.linalg.inv(transform.matrix)
    offset = -inverse @ transform.offset
    return ndimage.affine_transform(label.astype(np.float32), inverse, offset, order=1)


def _known(angle_deg: float, scale: float, shift: tuple[float, float]) -> Affine2D:
    angle = math.radians(angle_deg)
    matrix = scale * np.array([[math.cos(angle), -math.sin(angle)],
                               [math.sin(angle), math.cos(angle)]])
    centre = np.array([48.0, 46.0])
    return Affine2D(matrix, centre + np.asarray(shift) - matrix @ centre)


@pytest.mark.parametrize("model", ["affine", "similarity"])
def test_recovers_a_known_transform(model):
    label = _ring()
    truth = _known(5.0, 1.04, (3.0, -4.0))
    (result,) = register_masks(label[None], _moving(label, truth)[None],
                               MaskAffineConfig(model=model))
    assert result.model == model and result.metric_after < result.metric_before
    points = np.argwhere(label > 0).astype(float)
    error = np.linalg.norm(result.transform.apply(points) - truth.apply(points), axis=1)
    assert error.mean() < 0.3, error.mean()


def test_aligned_pair_stays_put_and_slices_are_independent():
    label = _ring()
    shifted = _known(0.0, 1.0, (0.0, 5.0))
    results = register_masks(np.stack([label, label]),
                             np.stack([label.astype(np.float32), _moving(label, shifted)]))
    points = np.argwhere(label > 0).astype(float)
    assert np.abs(results[0].transform.apply(points) - points).max() < 0.1
    error = np.linalg.norm(results[1].transform.apply(points) - shifted.apply(points), axis=1)
    assert error.mean() < 0.3


def test_missing_prediction_falls_back_to_identity_with_the_reason():
    label = _ring()
    empty = np.zeros((1, SIZE, SIZE), np.float32)
    (result,) = register_masks(label[None], empty)
    assert result.model == "identity"
    assert result.transform.matrix.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert "predicted myocardium" in result.fallbacks[0]


def test_bad_inputs_raise():
    label = _ring()[None]
    with pytest.raises(ValueError, match="one \\[N, H, W\\] shape"):
        register_masks(label, np.zeros((1, SIZE, SIZE - 1), np.float32))
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        register_masks(label, np.full((1, SIZE, SIZE), 2.0, np.float32))
    with pytest.raises(ValueError, match="model"):
        MaskAffineConfig(model="bspline")
    with pytest.raises(ValueError, match="one entry per pyramid level"):
        MaskAffineConfig(iterations=(10,))
