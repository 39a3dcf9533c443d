from __future__ import annotations

import numpy as np
import pytest

from preprocessing.affine_pooling import SLICE_NOISE_MM, pool_affine_fits, stack_transform
from preprocessing.affine_registration import AffineResult
from preprocessing.config import PreprocessConfig
from preprocessing.transforms import Affine2D

SIZE = 64


def _ring(depth: int) -> np.ndarray:
    rows, cols = np.mgrid[:SIZE, :SIZE]
    radius = np.hypot(rows - 32, cols - 30)
    return np.repeat(((radius > 8) & (radius < 14))[None], depth, axis=0).astype(np.uint8)


def _fit(transform: Affine2D, model: str = "affine") -> AffineResult:
    return AffineResult(transform, model, -0.5, -0.6, 0.1)


def _shift(rows: float, cols: float) -> Affine2D:
    return Affine2D(np.eye(2), np.array([rows, cols]))


def test_stack_transform_recovers_a_shared_affine_exactly() -> None:
    truth = Affine2D.from_parameters(rotation_deg=4.0, scale=1.03, translation=(2.0, -1.0),
                                     centre=(32.0, 30.0))
    points = [np.argwhere(slice_ > 0).astype(float) for slice_ in _ring(3)]
    stack = stack_transform([truth] * 3, points)
    np.testing.assert_allclose(stack.matrix, truth.matrix, atol=1e-10)
    np.testing.assert_allclose(stack.offset, truth.offset, atol=1e-9)


def test_stack_pooling_averages_shifts_over_equal_myocardia() -> None:
    fits = [_fit(_shift(3.0, 1.0)), _fit(_shift(-1.0, 2.0)), _fit(_shift(1.0, 0.0))]
    pooled, record = pool_affine_fits(fits, _ring(3), "stack", pixel_spacing_mm=1.0)
    for fit in pooled:
        np.testing.assert_allclose(fit.transform.matrix, np.eye(2), atol=1e-10)
        np.testing.assert_allclose(fit.transform.offset, [1.0, 1.0], atol=1e-9)
    assert record["slices_used"] == [0, 1, 2]
    # evidence of each slice's own fit is kept
    assert [fit.metric_after for fit in pooled] == [-0.6] * 3


def test_shrink_weight_is_james_stein_on_the_spread() -> None:
    # two slices 3.2 px either side of the stack: a spread of 3.2 mm at 1 mm pixels
    fits = [_fit(_shift(3.2, 0.0)), _fit(_shift(-3.2, 0.0))]
    pooled, record = pool_affine_fits(fits, _ring(2), "shrink", pixel_spacing_mm=1.0,
                                      noise_mm=1.6)
    assert record["spread_mm"] == pytest.approx(3.2)
    assert record["weight"] == pytest.approx(1 - 1.6 ** 2 / 3.2 ** 2)  # 0.75
    np.testing.assert_allclose(pooled[0].transform.offset, [2.4, 0.0], atol=1e-9)
    np.testing.assert_allclose(pooled[1].transform.offset, [-2.4, 0.0], atol=1e-9)
    # 3.2 px of 0.25 mm (0.8 mm) is within a fit's noise: the slices share the stack's
    pooled, record = pool_affine_fits(fits, _ring(2), "shrink", pixel_spacing_mm=0.25,
                                      noise_mm=1.6)
    assert record["weight"] == 0.0
    np.testing.assert_allclose(pooled[0].transform.offset, [0.0, 0.0], atol=1e-9)


def test_identity_fallbacks_are_left_out_and_receive_the_stack_transform() -> None:
    fits = [_fit(_shift(2.0, -2.0)), _fit(Affine2D.identity(), model="identity"),
            _fit(_shift(2.0, -2.0))]
    pooled, record = pool_affine_fits(fits, _ring(3), "stack", pixel_spacing_mm=1.0)
    assert record["slices_used"] == [0, 2]
    np.testing.assert_allclose(pooled[1].transform.offset, [2.0, -2.0], atol=1e-9)
    assert pooled[1].model == "identity"  # the slice's own outcome is still reported


def test_slices_without_myocardium_do_not_vote() -> None:
    myocardium = _ring(2)
    myocardium[1] = 0
    fits = [_fit(_shift(1.0, 0.0)), _fit(_shift(-5.0, 0.0))]
    pooled, record = pool_affine_fits(fits, myocardium, "stack", pixel_spacing_mm=1.0)
    assert record["slices_used"] == [0]
    np.testing.assert_allclose(pooled[1].transform.offset, [1.0, 0.0], atol=1e-9)


def test_slice_mode_and_nothing_to_pool_leave_the_fits_alone() -> None:
    fits = [_fit(_shift(1.0, 0.0)), _fit(_shift(-5.0, 0.0))]
    same, record = pool_affine_fits(fits, _ring(2), "slice", pixel_spacing_mm=1.0)
    assert same == fits and record == {"mode": "slice"}
    same, record = pool_affine_fits(fits, np.zeros((2, SIZE, SIZE)), "shrink", 1.0)
    assert same == fits and "skipped" in record


def test_bad_arguments_raise() -> None:
    fits = [_fit(_shift(1.0, 0.0))]
    with pytest.raises(ValueError, match="pooling must be one of"):
        pool_affine_fits(fits, _ring(1), "mean", 1.0)
    with pytest.raises(ValueError, match="one myocardium slice per fit"):
        pool_affine_fits(fits, _ring(2), "stack", 1.0)
    with pytest.raises(ValueError, match="pixel_spacing_mm > 0"):
        pool_affine_fits(fits, _ring(1), "stack", 0.0)
    with pytest.raises(ValueError, match="non-collinear"):
        stack_transform([Affine2D.identity()], [np.array([[0.0, 0.0], [1.0, 1.0]])])
    with pytest.raises(ValueError, match="affine_pooling must be one of"):
        PreprocessConfig(affine_pooling="mean")
    assert SLICE_NOISE_MM > 0
