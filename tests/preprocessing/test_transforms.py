from __future__ import annotations

import numpy as np
import pytest

from preprocessing.transforms import Affine2D, compose_fields, identity_field, warp


def test_translation_pulls_content_in_the_opposite_direction():
    image = np.zeros((10, 10), np.float32)
    image[5, 5] = 1.0
    shift = Affine2D.from_parameters(translation=(2.0, -1.0))  # sample 2 rows down, 1 col left
    out = warp(image, shift.field((10, 10)), is_label=False)
    assert out[3, 6] == pytest.approx(1.0) and out.sum() == pytest.approx(1.0)


def test_rotation_about_centre_keeps_centre_and_known_point():
    rotation = Affine2D.from_parameters(rotation_deg=90.0, centre=(5.0, 5.0))
    np.testing.assert_allclose(rotation.apply(np.array([5.0, 5.0])), [5.0, 5.0], atol=1e-12)
    np.testing.assert_allclose(rotation.apply(np.array([5.0, 7.0])), [3.0, 5.0], atol=1e-12)


def test_then_inverse_and_round_trip():
    a = Affine2D.from_parameters(rotation_deg=7.0, scale=1.05, translation=(1.5, -2.0),
                                 centre=(30.0, 40.0))
    b = Affine2D.from_parameters(rotation_deg=-3.0, translation=(0.5, 0.25))
    points = np.random.default_rng(0).uniform(0, 64, size=(20, 2))
    np.testing.assert_allclose(a.then(b).apply(points), b.apply(a.apply(points)), atol=1e-10)
    np.testing.assert_allclose(a.then(a.inverse()).apply(points), points, atol=1e-10)
    np.testing.assert_allclose(Affine2D.from_dict(a.to_dict()).matrix, a.matrix)


def test_composed_fields_equal_the_composed_affine():
    a = Affine2D.from_parameters(rotation_deg=4.0, translation=(2.0, 1.0), centre=(16, 16))
    b = Affine2D.from_parameters(scale=0.97, translation=(-1.0, 0.5), centre=(16, 16))
    composed = compose_fields(a.field((32, 32)), b.field((32, 32)))
    # Linear interpolation of an affine displacement is exact away from the clamped border.
    np.testing.assert_allclose(composed[:, 4:-4, 4:-4], a.then(b).field((32, 32))[:, 4:-4, 4:-4],
                               atol=1e-9)


def test_identity_field_and_label_warp_stay_integral():
    field = identity_field((4, 5))
    assert field.shape == (2, 4, 5) and field[0, 3, 1] == 3 and field[1, 3, 1] == 1
    label = np.arange(20, dtype=np.uint8).reshape(4, 5) % 4
    np.testing.assert_array_equal(warp(label, field, is_label=True), label)
    half = field + 0.4
    assert warp(label, half, is_label=True).dtype == np.uint8


def test_bad_affines_raise():
    with pytest.raises(ValueError, match="2x2"):
        Affine2D(np.eye(3), np.zeros(2))
    with pytest.raises(ValueError, match="non-finite"):
        Affine2D(np.eye(2), np.array([np.nan, 0.0]))
