"""The recovered fraction: how much of a known misalignment a registration stage undid."""

from __future__ import annotations

import numpy as np
import pytest

from preprocessing.alignment_error import recovered_fraction


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
