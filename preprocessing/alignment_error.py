"""Residual misalignment of the myocardium after each registration stage, against known truth.

The truth is a per-slice sampling map ``W`` (see :mod:`datasets.misalignment`): moving-image
point -> the reference-frame point whose anatomy it shows. For a myocardium pixel ``q`` of the
output, a stage's sampling position ``p`` in the moving slice is correct when ``W(p) = q``; the
in-plane residual ``|W(p) - q|`` in mm is the alignment error that stage leaves.

The error *vectors* ``W(p) - q`` say more (:class:`MyocardialErrors`): how much of the known
misalignment a stage undid (a metric whose optimum barely differs from where the slice started
leaves the error pointing the way it did before registration), how far it leaves the heart as a
whole, and about how small the residual of a translation-only or an affine stage could be.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from datasets.raw import Volume
from preprocessing.pipeline import AlignedCase

STAGES = ("none", "affine", "affine+nonrigid")

#: ``truth_map(sequence, native slice index, xy [N, 2]) -> xy in the reference frame``
TruthMap = Callable[[str, int, np.ndarray], np.ndarray]
#: ``frame(sequence, world points [N, 3]) -> xy [N, 2]`` in the frame the truth is written in
Frame = Callable[[str, np.ndarray], np.ndarray]


def plane_mm(volume: Volume, world: np.ndarray) -> np.ndarray:
    """World points ``[N, 3]`` -> the volume's own in-plane mm coordinates ``(col*sx, row*sy)``."""
    inverse = np.linalg.inv(volume.affine)
    voxel = world @ inverse[:3, :3].T + inverse[:3, 3]
    _, sy, sx = volume.spacing
    return np.stack([voxel[:, 0] * sx, voxel[:, 1] * sy], axis=1)


def myocardial_residuals(aligned: AlignedCase, final_fields: dict[str, np.ndarray],
                         truth_map: TruthMap, frame: Frame) -> dict[str, dict[str, np.ndarray]]:
    """Residual (mm) of every output myocardium pixel, per moving sequence and stage."""
    return {name: {stage: errors.residuals(stage) for stage in errors.stages}
            for name, errors in myocardial_errors(aligned, final_fields, truth_map,
                                                  frame).items()}


def recovered_fraction(before: np.ndarray, after: np.ndarray) -> float:
    """Share of the initial error vectors ``before [N, 2]`` that a stage removed.

    The correction applied, ``before - after``, projected on ``before``: 1 when the known
    misalignment is undone, 0 when the slice was not moved along it, negative when moved the
    wrong way.
    """
    before, after = np.asarray(before, np.float64), np.asarray(after, np.float64)
    if before.shape != after.shape or before.ndim != 2 or before.shape[1] != 2:
        raise ValueError(f"expected two [N, 2] error arrays, got {before.shape}, {after.shape}")
    energy = float((before * before).sum())
    if energy == 0:
        raise ValueError("no initial misalignment: the recovered fraction is undefined")
    return 1.0 - float((after * before).sum()) / energy


@dataclass(frozen=True)
class MyocardialErrors:
    """Error vectors ``W(p) - q`` (mm) of one moving sequence's output myocardium pixels.

    ``points [N, 2]``: the pixels ``q`` in the fixed frame (mm); ``slices [N]``: their output
    slice; ``stages``: stage -> ``[N, 2]`` error vectors.
    """

    points: np.ndarray
    slices: np.ndarray
    stages: dict[str, np.ndarray]

    @classmethod
    def concatenate(cls, parts: list[MyocardialErrors]) -> MyocardialErrors:
        """Several cases' errors as one, their slices numbered apart."""
        if not parts:
            raise ValueError("nothing to concatenate")
        offsets = np.cumsum([0] + [int(part.slices.max(initial=-1)) + 1 for part in parts])
        return cls(np.concatenate([part.points for part in parts]),
                   np.concatenate([part.slices + offset
                                   for part, offset in zip(parts, offsets[:-1], strict=True)]),
                   {stage: np.concatenate([part.stages[stage] for part in parts])
                    for stage in parts[0].stages})

    def residuals(self, stage: str) -> np.ndarray:
        return np.linalg.norm(self.stages[stage], axis=1)

    def relative_to(self, unwarped: MyocardialErrors) -> MyocardialErrors:
        """Errors measured against the registration's own result on the unwarped slices.

        ``unwarped`` holds the same pixels' errors when the pipeline ran on the images without
        the known warp. Its stage vectors are how far registration moves slices that already
        agree with the reference; subtracting them leaves what the warp changed: zero for a
        registration that undoes any known warp exactly (equivariant), whatever its own
        disagreement with the reference.
        """
        if (self.points.shape != unwarped.points.shape
                or not np.allclose(self.points, unwarped.points)
                or not np.array_equal(self.slices, unwarped.slices)):
            raise ValueError("the unwarped errors are not of the same myocardium pixels")
        missing = set(self.stages) - set(unwarped.stages)
        if missing:
            raise ValueError(f"the unwarped errors lack stage(s) {sorted(missing)}")
        return MyocardialErrors(self.points, self.slices,
                                {stage: vectors - unwarped.stages[stage]
                                 for stage, vectors in self.stages.items()})

    def recovered_fraction(self, stage: str) -> float:
        return recovered_fraction(self.stages["none"], self.stages[stage])

    def centre_errors(self, stage: str) -> np.ndarray:
        """Each slice's mean error vector ``[K, 2]`` (slices in increasing order): where the
        stage leaves the heart as a whole, whatever rotation or deformation remains."""
        errors = self.stages[stage]
        return np.stack([errors[self.slices == k].mean(axis=0) for k in np.unique(self.slices)])

    def centre_error(self, stage: str) -> float:
        """Mean over slices of the length of :meth:`centre_errors`."""
        return float(np.linalg.norm(self.centre_errors(stage), axis=1).mean())

    def about_centre_error(self, stage: str) -> float:
        """Mean residual once each slice's mean error (:meth:`centre_errors`) is taken away.

        What a perfect heart-centre translation would still leave: the rotation, scaling and
        deformation the stage got wrong. Applied to stage ``"none"`` it is the translation floor.
        """
        _, index = np.unique(self.slices, return_inverse=True)
        left = self.stages[stage] - self.centre_errors(stage)[index]
        return float(np.linalg.norm(left, axis=1).mean())

    def floors(self) -> dict[str, float]:
        """Mean residual left by the per-slice translation and the per-slice affine map that best
        undo the initial errors: about the least a registration of that model can achieve.

        Each model is fitted to the initial error vectors by least squares: exact when the known
        warp is affine, first order in its non-rigid part (the errors of a near-identity warp
        and of a small correction add).
        """
        initial = self.stages["none"]
        left = np.empty(len(initial))
        for k in np.unique(self.slices):
            rows = self.slices == k
            errors = initial[rows]
            design = np.concatenate([self.points[rows], np.ones((rows.sum(), 1))], axis=1)
            fit, *_ = np.linalg.lstsq(design, errors, rcond=None)
            left[rows] = np.linalg.norm(errors - design @ fit, axis=1)
        return {"translation": self.about_centre_error("none"), "affine": float(left.mean())}


def myocardial_errors(aligned: AlignedCase, final_fields: dict[str, np.ndarray],
                      truth_map: TruthMap, frame: Frame) -> dict[str, MyocardialErrors]:
    """Error vectors of every output myocardium pixel, per moving sequence and stage."""
    out: dict[str, dict[str, list[np.ndarray]]] = {
        name: {stage: [] for stage in STAGES} for name in aligned.moving}
    points, slices = [], []
    row0, col0 = aligned.roi
    for i, grid in enumerate(aligned.grids):
        myocardium = aligned.label[i] > 0
        identity = np.stack(np.nonzero(myocardium)).astype(np.float64)
        identity += np.array([[row0], [col0]])
        fixed_xy = frame(aligned.fixed, grid.world_points(identity[:, :, None])[:, 0])
        points.append(fixed_xy)
        slices.append(np.full(len(fixed_xy), i))
        for name in aligned.moving:
            positions = {"none": identity,
                         "affine": aligned.affine_fields[name][i][:, myocardium],
                         "affine+nonrigid": final_fields[name][i][:, myocardium]}
            for stage, where in positions.items():
                world = grid.world_points(where.astype(np.float64)[:, :, None])[:, 0]
                mapped = truth_map(name, aligned.partners[name][i], frame(name, world))
                out[name][stage].append(mapped - fixed_xy)

    def joined(parts: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
        return np.concatenate(parts) if parts else np.empty(shape)

    return {name: MyocardialErrors(joined(points, (0, 2)), joined(slices, (0,)).astype(np.int64),
                                   {stage: joined(values, (0, 2))
                                    for stage, values in stages.items()})
            for name, stages in out.items()}
