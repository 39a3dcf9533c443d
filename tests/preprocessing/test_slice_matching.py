from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from datasets.raw import Volume
from preprocessing.slice_matching import choose_reference, match_slices, plane_distances


def _stack(num_slices: int, z0: float, dz: float, xy_origin=(0.0, 0.0), size=8) -> Volume:
    affine = np.diag([1.0, 1.0, dz, 1.0])
    affine[:3, 3] = (*xy_origin, z0)
    return Volume(np.zeros((num_slices, size, size), np.float32), affine, Path("mem"))


def test_nearest_plane_partner_and_threshold():
    reference = _stack(3, z0=0.0, dz=10.0)             # z = 0, 10, 20
    other = _stack(6, z0=-3.0, dz=6.0)                  # z = -3, 3, 9, 15, 21, 27
    match = match_slices(reference, other, max_distance_mm=2.0)
    assert match.partner == (None, 2, 4)               # |0-(-3)| = |0-3| = 3 > 2
    assert match.distance_mm == pytest.approx((3.0, 1.0, 1.0))
    assert match.matched == (1, 2)


def test_in_plane_field_of_view_offset_does_not_change_distance():
    reference = _stack(2, z0=0.0, dz=10.0)
    shifted = _stack(2, z0=0.5, dz=10.0, xy_origin=(40.0, -25.0), size=20)
    np.testing.assert_allclose(plane_distances(reference, shifted), [[0.5, 10.5], [9.5, 0.5]])


def test_reference_is_fewest_slices_with_labelled_tie_break():
    volumes = {"bSSFP": _stack(9, 0, 10), "LGE": _stack(4, 0, 10), "T2w": _stack(4, 0, 10)}
    assert choose_reference(volumes, prefer="T2w") == "T2w"
    assert choose_reference(volumes, prefer="bSSFP") == "LGE"


def test_threshold_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        match_slices(_stack(2, 0, 1), _stack(2, 0, 1), 0.0)
