"""2D spatial transforms on the preprocessing grid, in one convention used by every step.

A transform maps a *fixed* pixel position ``(row, col)`` (on the reference sequence's grid) to the
position in the *moving* image that should be sampled there ("pull" or backward mapping, as
``scipy.ndimage.map_coordinates`` and spatial transformer networks use). Positions are in grid
pixel units. Dense transforms are sampling fields of shape ``[2, H, W]`` (row, col).

Registration steps produce transforms; the pipeline composes them and resamples the native image
once (no blur from repeated interpolation).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Affine2D:
    """``moving = matrix @ fixed + offset`` for ``(row, col)`` column vectors."""

    matrix: np.ndarray
    offset: np.ndarray

    def __post_init__(self) -> None:
        matrix = np.asarray(self.matrix, dtype=np.float64)
        offset = np.asarray(self.offset, dtype=np.float64)
        if matrix.shape != (2, 2) or offset.shape != (2,):
            raise ValueError(f"Affine2D needs a 2x2 matrix and 2-vector, got {matrix.shape}, "
                             f"{offset.shape}")
        if not (np.all(np.isfinite(matrix)) and np.all(np.isfinite(offset))):
            raise ValueError("Affine2D holds non-finite values")
        object.__setattr__(self, "matrix", matrix)
        object.__setattr__(self, "offset", offset)

    @classmethod
    def identity(cls) -> Affine2D:
        return cls(np.eye(2), np.zeros(2))

    @classmethod
    def from_parameters(cls, rotation_deg: float = 0.0, scale: float = 1.0,
                        translation: tuple[float, float] = (0.0, 0.0),
                        centre: tuple[float, float] = (0.0, 0.0)) -> Affine2D:
        """Rotation and isotropic scale about ``centre``, then ``translation`` (pixels)."""
        angle = np.deg2rad(rotation_deg)
        matrix = scale * np.array([[np.cos(angle), -np.sin(angle)],
                                   [np.sin(angle), np.cos(angle)]])
        centre_vector = np.asarray(centre, dtype=np.float64)
        return cls(matrix, centre_vector - matrix @ centre_vector + np.asarray(translation))

    def apply(self, points: np.ndarray) -> np.ndarray:
        """Map ``[..., 2]`` fixed positions to moving positions."""
        return points @ self.matrix.T + self.offset

    def then(self, other: Affine2D) -> Affine2D:
        """The transform that applies ``self`` first, then ``other`` (fixed -> mid -> moving)."""
        return Affine2D(other.matrix @ self.matrix, other.matrix @ self.offset + other.offset)

    def inverse(self) -> Affine2D:
        inverse = np.linalg.inv(self.matrix)
        return Affine2D(inverse, -inverse @ self.offset)

    def field(self, shape: tuple[int, int]) -> np.ndarray:
        """The dense ``[2, H, W]`` sampling field of this transform."""
        return self.map_field(identity_field(shape))

    def map_field(self, positions: np.ndarray) -> np.ndarray:
        """Map a ``[2, H, W]`` field of fixed positions to moving positions."""
        return np.moveaxis(self.apply(np.moveaxis(positions, 0, -1)), -1, 0)

    def to_dict(self) -> dict:
        return {"matrix": self.matrix.tolist(), "offset": self.offset.tolist()}

    @classmethod
    def from_dict(cls, values: dict) -> Affine2D:
        return cls(np.asarray(values["matrix"]), np.asarray(values["offset"]))


def identity_field(shape: tuple[int, int]) -> np.ndarray:
    """``[2, H, W]`` field whose value at each pixel is its own (row, col)."""
    rows, cols = np.meshgrid(np.arange(shape[0], dtype=np.float64),
                             np.arange(shape[1], dtype=np.float64), indexing="ij")
    return np.stack([rows, cols])


def compose_fields(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Field that applies ``first`` then ``second`` (``second`` sampled at ``first``'s positions).

    ``first`` maps fixed -> intermediate, ``second`` maps intermediate -> moving; positions outside
    ``second``'s extent are extrapolated linearly by clamping to the nearest edge displacement.
    """
    if first.shape[0] != 2 or second.shape[0] != 2:
        raise ValueError(f"fields must be [2, H, W], got {first.shape}, {second.shape}")
    displacement = second - identity_field(second.shape[1:])
    sampled = np.stack([ndimage.map_coordinates(component, first, order=1, mode="nearest")
                        for component in displacement])
    return first + sampled


def warp(image: np.ndarray, field: np.ndarray, *, is_label: bool) -> np.ndarray:
    """Sample ``image [H, W]`` at ``field [2, H', W']``: linear (nearest for labels), 0 outside."""
    order = 0 if is_label else 1
    out = ndimage.map_coordinates(image, field, order=order, mode="constant", cval=0)
    return out.astype(image.dtype, copy=False)
