"""Mapping predictions on the ROI grid back onto the reference sequence's native voxels.

:class:`~preprocessing.resample.PlaneGrid` places grid pixel ``(row, col)`` at
``origin + spacing * (row * row_axis + col * col_axis)`` in world mm, and the NIfTI affine places
native voxel ``(x, y, k)`` at ``affine @ (x, y, k, 1)``. Every grid lies in the plane of its own
reference slice, so for a native voxel of that slice the inverse is exact: solve
``world - origin = spacing * (row * row_axis + col * col_axis) + t * slice_axis`` for
``(row, col, t)`` (``t`` is 0 up to rounding; the slice axis is the one
:func:`~preprocessing.resample.sample_slice` projects along, which keeps oblique or sheared
affines exact).

Class *probabilities* are interpolated there (linearly) and only then turned into labels: an
argmax after interpolation gives smooth boundaries at the native resolution, where resampling a
label map would copy the 1 mm staircase. Voxels outside the ROI and slices without a prediction
are background.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from datasets.raw import Volume
from preprocessing.resample import PlaneGrid


def grid_positions(volume: Volume, index: int, grid: PlaneGrid) -> np.ndarray:
    """``[2, Y, X]`` (row, col) grid positions of the native voxels of slice ``index``."""
    if not 0 <= index < volume.num_slices:
        raise ValueError(f"slice {index} outside 0..{volume.num_slices - 1} of {volume.source}")
    _, height, width = volume.array.shape
    rows, cols = np.mgrid[:height, :width]
    voxels = np.stack([cols.ravel(), rows.ravel(), np.full(rows.size, index),
                       np.ones(rows.size)]).astype(np.float64)
    world = (volume.affine @ voxels)[:3].T
    axes = np.stack([grid.row_axis * grid.spacing, grid.col_axis * grid.spacing,
                     volume.affine[:3, 2]], axis=1)
    solved = np.linalg.solve(axes, (world - grid.origin).T)
    return solved[:2].reshape(2, height, width)


def probabilities_to_native(probabilities: np.ndarray, volume: Volume, slices: Sequence[int],
                            grids: Sequence[PlaneGrid], origin: tuple[int, int]) -> np.ndarray:
    """Native class probabilities ``[Z, K, Y, X]`` (float32) from ROI ones ``[D, K, h, w]``.

    ``probabilities[i]`` covers rows ``origin[0] .. origin[0] + h`` and columns
    ``origin[1] .. origin[1] + w`` of ``grids[i]``, which lies on native slice ``slices[i]``.
    Positions up to half a pixel beyond the ROI's outer pixel centres take the border value;
    everything farther out, and every other slice, is background with probability 1.
    """
    if probabilities.ndim != 4:
        raise ValueError(f"expected probabilities [D, K, h, w], got {probabilities.shape}")
    if not len(slices) == len(grids) == len(probabilities):
        raise ValueError(f"need one grid and one slice index per predicted slice, got "
                         f"{len(grids)}, {len(slices)} for {len(probabilities)}")
    _, classes, height, width = probabilities.shape
    native = np.zeros((volume.num_slices, classes, *volume.array.shape[1:]), dtype=np.float32)
    native[:, 0] = 1.0
    for prediction, index, grid in zip(probabilities, slices, grids, strict=True):
        positions = grid_positions(volume, index, grid)
        positions -= np.array(origin, dtype=np.float64)[:, None, None]
        inside = ((positions[0] >= -0.5) & (positions[0] <= height - 0.5)
                  & (positions[1] >= -0.5) & (positions[1] <= width - 0.5))
        if not inside.any():
            continue
        points = positions[:, inside]
        for k in range(classes):
            native[index, k][inside] = ndimage.map_coordinates(
                prediction[k], points, order=1, mode="nearest")
    return native


def labels_from_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """``[Z, Y, X]`` uint8 argmax over the class axis of ``[Z, K, Y, X]``."""
    return probabilities.argmax(axis=1).astype(np.uint8)
