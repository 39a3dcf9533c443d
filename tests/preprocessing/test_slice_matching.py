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


def _rotated(volume: Volume, degrees: float, path: str) -> Volume:
    """``volume`` with its slice planes turned by ``degrees`` about the world x axis."""
    angle = np.radians(degrees)
    turn = np.eye(4)
    turn[1:3, 1:3] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    return Volume(volume.array, turn @ volume.affine, Path(path))


def test_a_stack_of_another_view_is_refused_naming_its_file():
    """A sagittal T2w stack with a consistent affine used to be matched "at 0.31 mm" to one of
    its columns for every LGE slice; now its file is named and nothing is matched."""
    reference = _stack(3, z0=0.0, dz=10.0)
    sagittal = Volume(np.zeros((200, 8, 8), np.float32),
                      np.array([[0, 0, 1.0, -100], [1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1]]),
                      Path("t2w_sagittal.nii.gz"))
    with pytest.raises(ValueError, match=r"t2w_sagittal.nii.gz: its slices lie 90 degrees off"):
        match_slices(reference, sagittal, max_distance_mm=5.0)
    # A few degrees of planning difference are normal; 30 degrees is another view.
    assert match_slices(reference, _rotated(reference, 8.0, "tilted"), 5.0).partner[1] == 1
    with pytest.raises(ValueError, match="tilted: its slices lie 30 degrees"):
        match_slices(reference, _rotated(reference, 30.0, "tilted"), 5.0)
    # Reversed slice order is the same view.
    flipped = Volume(reference.array, reference.affine @ np.diag([1, 1, -1, 1.0]), Path("f"))
    assert match_slices(reference, flipped, 5.0).matched == (0,)
    for bad in (float("nan"), float("inf"), 0.0):
        with pytest.raises(ValueError, match="positive"):
            match_slices(reference, reference, bad)
