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
