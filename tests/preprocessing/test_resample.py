from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from datasets.raw import Volume
from preprocessing.intensity import normalise_to_255
from preprocessing.resample import PlaneGrid, sample_slice


def _volume(values: np.ndarray, spacing: float, origin=(0.0, 0.0, 0.0)) -> Volume:
    affine = np.diag([spacing, spacing, 10.0, 1.0])
    affine[:3, 3] = origin
    return Volume(values, affine, Path("mem"))


def _world_x_volume(spacing: float, size: int, origin=(0.0, 0.0, 0.0)) -> Volume:
    """Intensity equal to the world x coordinate of each voxel centre."""
    x = origin[0] + np.arange(size) * spacing
    values = np.broadcast_to(x[None, None, :], (1, size, size)).astype(np.float32)
    return _volume(values.copy(), spacing, origin)


def test_identity_grid_reproduces_slice_exactly():
    rng = np.random.default_rng(1)
    volume = _volume(rng.random((2, 16, 16)).astype(np.float32), 1.0)
    grid = PlaneGrid.centred_on_slice(volume, 1, size=16, spacing=1.0)
    np.testing.assert_allclose(sample_slice(volume, 1, grid, is_label=False), volume.array[1],
                               atol=1e-6)


def test_resampled_values_follow_world_coordinates_across_pixel_sizes():
    fine = _world_x_volume(0.8929, 200, origin=(-60.0, -60.0, 0.0))
    coarse = _world_x_volume(1.172, 160, origin=(-75.0, -70.0, 0.0))
    grid = PlaneGrid.centred_on_slice(fine, 0, size=64, spacing=1.0)
    expected = grid.world_points()[..., 0]
    # The linear ramp survives anti-aliasing and interpolation away from the borders.
    np.testing.assert_allclose(sample_slice(fine, 0, grid, is_label=False), expected, atol=1e-3)
    np.testing.assert_allclose(sample_slice(coarse, 0, grid, is_label=False), expected, atol=1e-3)


def test_label_disk_keeps_its_area_in_mm2():
    spacing, size, radius = 0.75, 240, 25.0
    centre = (size - 1) / 2 * spacing
    y, x = np.mgrid[:size, :size] * spacing
    disk = ((x - centre) ** 2 + (y - centre) ** 2 <= radius**2).astype(np.uint8)
    volume = _volume(disk[None], spacing)
    grid = PlaneGrid.centred_on_slice(volume, 0, size=128, spacing=1.0)
    sampled = sample_slice(volume, 0, grid, is_label=True)
    assert sampled.dtype == np.uint8
    assert sampled.sum() == pytest.approx(np.pi * radius**2, rel=0.03)
    rows, cols = np.nonzero(sampled)
    assert rows.mean() == pytest.approx(63.5, abs=0.5)
    assert cols.mean() == pytest.approx(63.5, abs=0.5)


def test_outside_field_of_view_is_zero():
    volume = _volume(np.ones((1, 10, 10), np.float32), 1.0)
    grid = PlaneGrid.centred_on_slice(volume, 0, size=30, spacing=1.0)
    sampled = sample_slice(volume, 0, grid, is_label=False)
    assert sampled[0, 0] == 0.0 and sampled[15, 15] == pytest.approx(1.0)


def test_normalise_uses_percentiles_and_clips():
    stack = np.concatenate([np.linspace(0, 100, 1001), [1e6]]).astype(np.float32)
    scaled, (low, high) = normalise_to_255(stack, 0.0, 99.0)
    assert low == 0.0 and high < 101
    assert scaled.max() == 255.0 and scaled.min() == 0.0
    assert scaled[500] == pytest.approx(50.0 / high * 255, rel=1e-4)
    with pytest.raises(ValueError, match="flat: constant"):
        normalise_to_255(np.ones(10), source="flat")
