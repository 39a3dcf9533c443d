"""Error vectors against a known misalignment: what a stage undid, and what it could at best."""

from __future__ import annotations

import numpy as np
import pytest

from preprocessing.alignment_error import MyocardialErrors, recovered_fraction


@pytest.fixture
def before():
    return np.random.default_rng(0).normal(0.0, 2.0, size=(500, 2))


def test_known_values(before):
    assert recovered_fraction(before, np.zeros_like(before)) == pytest.approx(1.0)
    assert recovered_fraction(before, before) == pytest.approx(0.0)
    assert recovered_fraction(before, 0.25 * before) == pytest.approx(0.75)
    # Moved the wrong way: the error doubled along its own direction.
    assert recovered_fraction(before, 2 * before) == pytest.approx(-1.0)


def test_errors_across_the_warp_do_not_count_as_recovery(before):
    across = before[:, ::-1] * np.array([1.0, -1.0])  # each vector turned by 90 degrees
    assert recovered_fraction(before, before + across) == pytest.approx(0.0, abs=1e-12)
    assert recovered_fraction(before, 0.5 * before + across) == pytest.approx(0.5)


@pytest.mark.parametrize(("first", "second"), [((5, 2), (4, 2)), ((5, 3), (5, 3)), ((5,), (5,))])
def test_bad_shapes_raise(first, second):
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        recovered_fraction(np.ones(first), np.ones(second))


def test_no_initial_misalignment_raises():
    with pytest.raises(ValueError, match="undefined"):
        recovered_fraction(np.zeros((3, 2)), np.ones((3, 2)))


def _ring_errors(initial_of, stage_of=None):
    """Two slices of ring points with initial errors ``initial_of(points, slice)``."""
    angles = np.linspace(0, 2 * np.pi, 90, endpoint=False)
    ring = np.stack([30 + 20 * np.cos(angles), 40 + 20 * np.sin(angles)], axis=1)
    points = np.concatenate([ring, ring + 5.0])
    slices = np.repeat([0, 1], len(ring))
    initial = np.concatenate([initial_of(points[slices == k], k) for k in (0, 1)])
    stages = {"none": initial}
    if stage_of is not None:
        stages["affine"] = np.concatenate([stage_of(points[slices == k], k) for k in (0, 1)])
    return MyocardialErrors(points, slices, stages)


def test_floors_of_a_translation_and_of_an_affine_warp():
    shifted = _ring_errors(lambda p, k: np.tile([[2.0, -1.0 - k]], (len(p), 1)))
    assert shifted.floors() == pytest.approx({"translation": 0.0, "affine": 0.0}, abs=1e-9)
    angle = np.deg2rad(3.0)
    turn = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    rotated = _ring_errors(lambda p, k: (p - p.mean(0)) @ (turn - np.eye(2)).T + [1.0, k])
    floors = rotated.floors()
    assert floors["affine"] == pytest.approx(0.0, abs=1e-9)
    # What a rotation by 3 degrees moves a 20 mm ring's points: 2 * 20 * sin(1.5 degrees).
    assert floors["translation"] == pytest.approx(40 * np.sin(angle / 2), rel=1e-9)


def test_centre_error_recovered_fraction_and_concatenation():
    errors = _ring_errors(lambda p, k: np.tile([[3.0, 4.0]], (len(p), 1)),
                          lambda p, k: np.tile([[0.6, 0.8 * (k + 1)]], (len(p), 1)))
    assert errors.centre_error("none") == pytest.approx(5.0)
    assert errors.centre_error("affine") == pytest.approx(
        (1.0 + np.hypot(0.6, 1.6)) / 2)
    assert errors.residuals("none") == pytest.approx(np.full(180, 5.0))
    both = MyocardialErrors.concatenate([errors, errors])
    np.testing.assert_array_equal(np.unique(both.slices), [0, 1, 2, 3])
    assert both.centre_error("affine") == pytest.approx(errors.centre_error("affine"))
    assert both.recovered_fraction("affine") == pytest.approx(errors.recovered_fraction("affine"))
    with pytest.raises(ValueError, match="nothing"):
        MyocardialErrors.concatenate([])


def test_about_centre_error_leaves_what_a_translation_cannot_undo():
    angle = np.deg2rad(4.0)
    turn = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    # Initially shifted only; the stage fixes the centre of slice 0 but turns it by 4 degrees,
    # and leaves slice 1 shifted by (3, 4) mm without any turn.
    errors = _ring_errors(lambda p, k: np.tile([[3.0, 4.0]], (len(p), 1)),
                          lambda p, k: ((p - p.mean(0)) @ (turn - np.eye(2)).T if k == 0
                                        else np.tile([[3.0, 4.0]], (len(p), 1))))
    assert errors.about_centre_error("none") == pytest.approx(0.0, abs=1e-12)
    # Slice 0 keeps 2 * 20 * sin(2 degrees) at every point, slice 1 nothing.
    assert errors.about_centre_error("affine") == pytest.approx(20 * np.sin(angle / 2), rel=1e-9)
    assert errors.centre_error("affine") == pytest.approx(2.5, rel=1e-9)
    # The residual is at least what is left about the centre, slice by slice.
    assert errors.residuals("affine").mean() >= errors.about_centre_error("affine")
    assert errors.floors()["translation"] == errors.about_centre_error("none")


def test_relative_to_removes_the_unwarped_result():
    unwarped = _ring_errors(lambda p, k: np.zeros_like(p),
                            lambda p, k: np.tile([[1.0, -0.5 * k]], (len(p), 1)))
    # An equivariant registration: under the warp it lands exactly where it did without it.
    equivariant = _ring_errors(lambda p, k: np.tile([[2.0, 3.0]], (len(p), 1)),
                               lambda p, k: np.tile([[1.0, -0.5 * k]], (len(p), 1)))
    recovery = equivariant.relative_to(unwarped)
    assert recovery.residuals("affine") == pytest.approx(np.zeros(180), abs=1e-12)
    assert recovery.residuals("none") == pytest.approx(np.full(180, np.hypot(2.0, 3.0)))
    # One that stops 1 mm short along x keeps exactly that, not its disagreement with the
    # reference.
    short = _ring_errors(lambda p, k: np.tile([[2.0, 3.0]], (len(p), 1)),
                         lambda p, k: np.tile([[2.0, -0.5 * k]], (len(p), 1)))
    assert short.relative_to(unwarped).residuals("affine") == pytest.approx(np.ones(180))


def test_relative_to_refuses_other_pixels_or_stages():
    errors = _ring_errors(lambda p, k: np.ones_like(p), lambda p, k: np.ones_like(p))
    moved = MyocardialErrors(errors.points + 1.0, errors.slices, errors.stages)
    with pytest.raises(ValueError, match="same myocardium pixels"):
        errors.relative_to(moved)
    with pytest.raises(ValueError, match="lack stage"):
        errors.relative_to(MyocardialErrors(errors.points, errors.slices,
                                            {"none": errors.stages["none"]}))
