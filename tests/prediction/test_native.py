from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from datasets.raw import Volume
from prediction.native import grid_positions, labels_from_probabilities, probabilities_to_native
from preprocessing.resample import PlaneGrid, sample_slice


def oblique_volume(shape_zyx=(3, 150, 170), spacing_xyz=(0.7, 0.75, 9.0),
                   shear: float = 0.0) -> Volume:
    """A volume whose axes are rotated in world space (and optionally sheared in-plane)."""
    rotation = Rotation.from_euler("xyz", [25, -15, 40], degrees=True).as_matrix()
    linear = rotation @ np.diag(spacing_xyz)
    linear[:, 1] += shear * linear[:, 0]
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = [-40.0, 12.0, 30.0]
    return Volume(np.zeros(shape_zyx, np.float32), affine, Path("oblique.nii.gz"))


def disc_label(volume: Volume, centre_xy=(100.0, 60.0), radii=(14.0, 24.0)) -> Volume:
    """Ring labels (1 inner half, 2 outer half) around a native position on every slice."""
    _, ny, nx = volume.array.shape
    y, x = np.mgrid[:ny, :nx]
    mm = np.hypot((x - centre_xy[0]) * 0.7, (y - centre_xy[1]) * 0.75)
    ring = (mm >= radii[0]) & (mm <= radii[1])
    label = np.where(ring, np.where(mm < sum(radii) / 2, 1, 2), 0).astype(np.uint8)
    return Volume(np.repeat(label[None], volume.num_slices, axis=0), volume.affine, volume.source)


@pytest.mark.parametrize("shear", [0.0, 0.2])
def test_grid_positions_invert_the_grid(shear):
    volume = oblique_volume(shear=shear)
    grid = PlaneGrid.centred_on_slice(volume, 1, 224, 1.0)
    positions = grid_positions(volume, 1, grid)
    assert positions.shape == (2, 150, 170)
    # The slice centre (voxel (84.5, 74.5)) lies between the middle grid pixels.
    assert positions[:, 74:76, 84:86].mean(axis=(1, 2)) == pytest.approx([111.5, 111.5])
    # Grid positions back to world land exactly on the native voxels' world points.
    rows, cols = np.mgrid[:150, :170]
    native = (volume.affine @ np.stack([cols.ravel(), rows.ravel(), np.ones(rows.size),
                                        np.ones(rows.size)]))[:3].T
    back = grid.world_points(positions).reshape(-1, 3)
    np.testing.assert_allclose(native, back, atol=1e-6)
    # One native column step moves 0.7 mm along the grid's column axis.
    np.testing.assert_allclose(positions[1, :, 1:] - positions[1, :, :-1], 0.7, atol=1e-9)
    with pytest.raises(ValueError):
        grid_positions(volume, 3, grid)


def test_probabilities_round_trip_through_the_roi_grid():
    volume = oblique_volume()
    label = disc_label(volume)
    grids = [PlaneGrid.centred_on_slice(volume, k, 224, 1.0) for k in (0, 2)]
    on_grid = np.stack([sample_slice(label, k, grid, is_label=True)
                        for k, grid in zip((0, 2), grids, strict=True)])
    _, rows, cols = np.nonzero(on_grid)
    origin = (int(rows.mean()) - 40, int(cols.mean()) - 40)
    roi = on_grid[:, origin[0]:origin[0] + 80, origin[1]:origin[1] + 80]
    assert roi.sum() == on_grid.sum()  # the ROI holds the whole ring
    probabilities = np.eye(4, dtype=np.float32)[roi].transpose(0, 3, 1, 2)
    native = probabilities_to_native(probabilities, volume, [0, 2], grids, origin)
    assert native.shape == (3, 4, 150, 170) and native.dtype == np.float32
    np.testing.assert_allclose(native.sum(axis=1), 1.0, atol=1e-6)
    labels = labels_from_probabilities(native)
    assert labels.dtype == np.uint8
    for k in (0, 2):
        for value in (1, 2):
            a, b = labels[k] == value, label.array[k] == value
            assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.9
    # The slice without a prediction, and everything outside the ROI, is background.
    assert (native[1, 0] == 1).all()
    positions = grid_positions(volume, 0, grids[0]) - np.array(origin)[:, None, None]
    outside = (positions < -0.5).any(axis=0) | (positions > 79.5).any(axis=0)
    assert outside.any() and (native[0, 0][outside] == 1).all()


def test_probabilities_to_native_checks_its_inputs():
    volume = oblique_volume()
    grid = PlaneGrid.centred_on_slice(volume, 0, 64, 1.0)
    with pytest.raises(ValueError, match="one grid"):
        probabilities_to_native(np.zeros((2, 4, 8, 8)), volume, [0], [grid], (0, 0))
    with pytest.raises(ValueError, match="expected"):
        probabilities_to_native(np.zeros((4, 8, 8)), volume, [0], [grid], (0, 0))
