from __future__ import annotations

import numpy as np
import pytest

from datasets.misalignment import (
    MisalignmentConfig,
    apply_slice_misalignment,
    sample_slice_misalignment,
    warp_slice,
)


def _translation_record(tx: float, ty: float) -> dict:
    zero = {"origin_mm": [-100.0, -100.0], "spacing_mm": 25.0,
            "coefficients_mm": np.zeros((2, 10, 10)).tolist()}
    return {"centre_mm": [0.0, 0.0], "rotation_deg": 0.0, "translation_mm": [tx, ty],
            "scale": 1.0, "nonrigid": zero}


def test_pure_translation_warps_by_whole_pixels():
    image = np.zeros((20, 30), np.float32)
    image[8:12, 10:14] = 1.0
    out = warp_slice(image, (0.5, 1.0), _translation_record(2.0, 3.0), is_label=True)
    # Output pixel (row, col) shows input (row + 3 / 1.0, col + 2 / 0.5).
    np.testing.assert_array_equal(out[5:9, 6:10], 1.0)
    assert out.sum() == image.sum()


def test_warping_a_slice_samples_it_where_the_record_maps_each_pixel():
    """warp_slice evaluates W on the pixel grid (separably); it must agree with W at the same
    points taken one by one, with a field, a rotation and unequal pixel sizes."""
    from scipy import ndimage

    rng = np.random.default_rng(5)
    image = ndimage.gaussian_filter(rng.random((40, 56)), 2.0).astype(np.float32)
    spacing = (1.25, 0.8)  # (x, y) mm
    xs, ys = np.arange(56) * spacing[0], np.arange(40) * spacing[1]
    config = MisalignmentConfig(max_rotation_deg=8, max_translation_mm=5, max_scale=0.05,
                                nonrigid_mm=1.5, nonrigid_grid_mm=10.0, reach_mm=30.0)
    record, _ = sample_slice_misalignment(rng, (35.0, 16.0), xs, ys, config)
    assert np.abs(record["nonrigid"]["coefficients_mm"]).max() > 0
    rows, cols = np.mgrid[:40, :56]
    source = apply_slice_misalignment(
        record, np.stack([cols.ravel() * spacing[0], rows.ravel() * spacing[1]], axis=1))
    coords = np.stack([source[:, 1] / spacing[1], source[:, 0] / spacing[0]]).reshape(2, 40, 56)
    for order, is_label in ((3, False), (0, True)):
        expected = ndimage.map_coordinates(image, coords, order=order, mode="constant", cval=0)
        np.testing.assert_allclose(warp_slice(image, spacing, record, is_label=is_label),
                                   expected, rtol=0, atol=1e-6)


def test_sampled_misalignment_respects_bounds_and_inverts():
    config = MisalignmentConfig(max_rotation_deg=5, max_translation_mm=4, max_scale=0.04,
                                nonrigid_mm=1.5)
    xs = ys = np.arange(-60.0, 60.0, 2.0)
    rng = np.random.default_rng(3)
    for _ in range(5):
        record, field = sample_slice_misalignment(rng, (5.0, -3.0), xs, ys, config)
        assert abs(record["rotation_deg"]) <= 5 and abs(record["scale"] - 1) <= 0.04
        assert np.hypot(*record["translation_mm"]) <= 4 + 1e-9
        assert np.hypot(*field).max() <= 1.5 + 1e-9
        points = rng.uniform(-40, 40, size=(50, 2))
        there = apply_slice_misalignment(record, points)
        np.testing.assert_allclose(apply_slice_misalignment(record, there, inverse=True), points,
                                   atol=1e-6)


def test_bad_config_raises():
    with pytest.raises(ValueError):
        MisalignmentConfig(max_scale=0.6)
    with pytest.raises(ValueError):
        MisalignmentConfig(nonrigid_grid_mm=0)
