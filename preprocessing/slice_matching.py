"""Slice correspondence across sequences from world positions alone.

Short-axis stacks of different sequences are planned separately, so slice ``k`` of bSSFP is not
slice ``k`` of LGE. For every slice of the reference stack we take the slice of the other stack
whose plane lies closest to the reference slice centre (the through-plane distance; in-plane field
of view offsets do not matter) and drop reference slices with no partner within a threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from datasets.raw import RawDataError, Volume

#: Largest angle (degrees) between two stacks' slice normals that still counts as the same view.
#: Short-axis stacks of one examination are planned alike (a few degrees apart); a sagittal or
#: long-axis stack is 60-90 degrees off, and matching its slices "by distance" to short-axis
#: centres would pair every slice with one column of it.
MAX_NORMAL_ANGLE_DEG = 20.0


@dataclass(frozen=True)
class SliceMatch:
    """Partner slice index (or None when too far) and its distance in mm, per reference slice."""

    partner: tuple[int | None, ...]
    distance_mm: tuple[float, ...]

    @property
    def matched(self) -> tuple[int, ...]:
        """Reference slice indices that found a partner."""
        return tuple(k for k, partner in enumerate(self.partner) if partner is not None)


def normal_angle_deg(reference: Volume, other: Volume) -> float:
    """Angle between the two stacks' slice planes in degrees (0..90; slice order ignored)."""
    cosine = abs(float(reference.slice_normal @ other.slice_normal))
    return float(np.degrees(np.arccos(min(cosine, 1.0))))


def check_same_view(reference: Volume, other: Volume,
                    max_angle_deg: float = MAX_NORMAL_ANGLE_DEG) -> None:
    """Refuse a stack whose slices are not (nearly) parallel to the reference's."""
    angle = normal_angle_deg(reference, other)
    if angle > max_angle_deg:
        raise RawDataError(
            f"{other.source}: its slices lie {angle:.0f} degrees off those of "
            f"{reference.source} (at most {max_angle_deg:.0f} allowed): not the same short-axis "
            "view (a sagittal or long-axis stack?); slices cannot be matched")


def plane_distances(reference: Volume, other: Volume) -> np.ndarray:
    """``[Z_ref, Z_other]`` distances (mm) from each reference slice centre to each other plane."""
    centres = reference.slice_centres()
    other_centres = other.slice_centres()
    normal = other.slice_normal
    return np.abs((centres[:, None, :] - other_centres[None, :, :]) @ normal)


def match_slices(reference: Volume, other: Volume, max_distance_mm: float) -> SliceMatch:
    """Nearest-plane partner in ``other`` for every slice of ``reference``.

    The stacks must show the same view (:func:`check_same_view`).

    Each other slice may serve several reference slices only if they are equally close; in
    practice reference stacks are the sparser ones, so partners are unique.
    """
    if not max_distance_mm > 0 or not np.isfinite(max_distance_mm):
        raise ValueError(f"max_distance_mm must be a positive number, got {max_distance_mm}")
    check_same_view(reference, other)
    distances = plane_distances(reference, other)
    nearest = distances.argmin(axis=1)
    best = distances[np.arange(len(nearest)), nearest]
    partner = tuple(int(j) if d <= max_distance_mm else None for j, d in zip(nearest, best,
                                                                              strict=True))
    return SliceMatch(partner=partner, distance_mm=tuple(float(d) for d in best))


def choose_reference(volumes: dict[str, Volume], prefer: str | None = None) -> str:
    """The sequence with the fewest slices; ties go to ``prefer`` (the labelled one), then order."""
    fewest = min(volume.num_slices for volume in volumes.values())
    candidates = [name for name, volume in volumes.items() if volume.num_slices == fewest]
    return prefer if prefer in candidates else candidates[0]
