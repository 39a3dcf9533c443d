"""Residual misalignment of the myocardium after each registration stage, against known truth.

The truth is a per-slice sampling map ``W`` (see :mod:`datasets.misalignment`): moving-image
point -> the reference-frame point whose anatomy it shows. For a myocardium pixel ``q`` of the
output, a stage's sampling position ``p`` in the moving slice is correct when ``W(p) = q``; the
in-plane residual ``|W(p) - q|`` in mm is the alignment error that stage leaves.

The error *vectors* ``W(p) - q`` also say how much of the known misalignment a stage undid
(:func:`recovered_fraction`): a metric whose optimum barely differs from where the slice started
leaves the error pointing the way it did before registration.
"""

from __future__ import annotations

from collections.abc import Callable

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
    return {name: {stage: np.linalg.norm(errors, axis=1) for stage, errors in stages.items()}
            for name, stages in myocardial_errors(aligned, final_fields, truth_map,
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


def myocardial_errors(aligned: AlignedCase, final_fields: dict[str, np.ndarray],
                      truth_map: TruthMap, frame: Frame) -> dict[str, dict[str, np.ndarray]]:
    """Error vectors ``W(p) - q`` (mm, ``[N, 2]``) of every output myocardium pixel, per moving
    sequence and stage."""
    out: dict[str, dict[str, list[np.ndarray]]] = {
        name: {stage: [] for stage in STAGES} for name in aligned.moving}
    row0, col0 = aligned.roi
    for i, grid in enumerate(aligned.grids):
        myocardium = aligned.label[i] > 0
        identity = np.stack(np.nonzero(myocardium)).astype(np.float64)
        identity += np.array([[row0], [col0]])
        fixed_xy = frame(aligned.fixed, grid.world_points(identity[:, :, None])[:, 0])
        for name in aligned.moving:
            positions = {"none": identity,
                         "affine": aligned.affine_fields[name][i][:, myocardium],
                         "affine+nonrigid": final_fields[name][i][:, myocardium]}
            for stage, where in positions.items():
                world = grid.world_points(where.astype(np.float64)[:, :, None])[:, 0]
                mapped = truth_map(name, aligned.partners[name][i], frame(name, world))
                out[name][stage].append(mapped - fixed_xy)
    return {name: {stage: np.concatenate(values) if values else np.empty((0, 2))
                   for stage, values in stages.items()} for name, stages in out.items()}
