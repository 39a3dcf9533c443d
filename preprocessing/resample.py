"""Resampling of individual slices onto a common 2D grid defined in world millimetres.

The target grid lies in a reference slice plane, has square pixels (1 mm by default) and is
centred on the reference slice centre, so resampling and centre cropping are a single
interpolation, and sequences with different pixel sizes or fields of view land on the same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from datasets.raw import Volume

_FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


@dataclass(frozen=True)
class PlaneGrid:
    """A ``size x size`` grid of ``spacing`` mm pixels in world space.

    Pixel ``(row, col)`` sits at ``origin + col * spacing * col_axis + row * spacing * row_axis``.
    """

    origin: np.ndarray
    row_axis: np.ndarray
    col_axis: np.ndarray
    size: int
    spacing: float

    @classmethod
    def centred_on_slice(cls, volume: Volume, index: int, size: int, spacing: float) -> PlaneGrid:
        if size < 1 or spacing <= 0:
            raise ValueError(f"grid size must be >= 1 and spacing > 0, got {size}, {spacing}")
        col_axis = volume.affine[:3, 0] / np.linalg.norm(volume.affine[:3, 0])
        row_axis = volume.affine[:3, 1] / np.linalg.norm(volume.affine[:3, 1])
        centre = volume.slice_centres()[index]
        half = (size - 1) / 2 * spacing
        origin = centre - half * (col_axis + row_axis)
        return cls(origin=origin, row_axis=row_axis, col_axis=col_axis, size=size, spacing=spacing)

    def world_points(self, field: np.ndarray | None = None) -> np.ndarray:
        """``[H, W, 3]`` world coordinates of grid positions.

        Without ``field``, the pixel centres; with a ``[2, H, W]`` field of (row, col) grid
        positions (see :mod:`preprocessing.transforms`), those positions.
        """
        if field is None:
            steps = np.arange(self.size) * self.spacing
            return (self.origin + steps[:, None, None] * self.row_axis
                    + steps[None, :, None] * self.col_axis)
        rows, cols = field[0] * self.spacing, field[1] * self.spacing
        return (self.origin + rows[..., None] * self.row_axis + cols[..., None] * self.col_axis)

    def to_dict(self) -> dict:
        return {"origin": self.origin.tolist(), "row_axis": self.row_axis.tolist(),
                "col_axis": self.col_axis.tolist(), "size": self.size, "spacing": self.spacing}

    @classmethod
    def from_dict(cls, record: dict) -> PlaneGrid:
        """Inverse of :meth:`to_dict` (manifests store grids this way)."""
        return cls(origin=np.asarray(record["origin"], dtype=np.float64),
                   row_axis=np.asarray(record["row_axis"], dtype=np.float64),
                   col_axis=np.asarray(record["col_axis"], dtype=np.float64),
                   size=int(record["size"]), spacing=float(record["spacing"]))


def sample_slice(volume: Volume, index: int, grid: PlaneGrid, *, is_label: bool,
                 field: np.ndarray | None = None) -> np.ndarray:
    """Slice ``index`` of ``volume`` resampled onto ``grid`` (optionally through ``field``).

    World points are projected into the slice along its normal. Images are low-pass filtered
    before linear interpolation when the grid is coarser than the source (no aliasing); labels use
    nearest-neighbour. Outside the field of view is 0. ``field`` (``[2, size, size]`` grid
    positions) carries registration, so native voxels are interpolated exactly once.
    """
    inverse = np.linalg.inv(volume.affine)
    points = grid.world_points(field).reshape(-1, 3)
    voxel = points @ inverse[:3, :3].T + inverse[:3, 3]
    coords = np.stack([voxel[:, 1], voxel[:, 0]])  # (row = y, col = x) in the source slice
    source = volume.array[index]
    shape = (grid.size, grid.size) if field is None else field.shape[1:]
    if is_label:
        sampled = ndimage.map_coordinates(source, coords, order=0, mode="constant", cval=0)
        return sampled.reshape(shape).astype(np.uint8)
    _, row_mm, col_mm = volume.spacing
    sigma = [antialias_sigma(grid.spacing / row_mm), antialias_sigma(grid.spacing / col_mm)]
    if max(sigma) > 0:
        source = ndimage.gaussian_filter(source, sigma=sigma, mode="nearest")
    sampled = ndimage.map_coordinates(source, coords, order=1, mode="constant", cval=0.0)
    return sampled.reshape(shape).astype(np.float32)


def antialias_sigma(ratio: float) -> float:
    """Gaussian sigma (source pixels) whose FWHM closes the gap to the coarser target pixel."""
    return float(np.sqrt(ratio**2 - 1.0) / _FWHM_PER_SIGMA) if ratio > 1.0 else 0.0
