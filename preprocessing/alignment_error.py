"""Residual misalignment of the myocardium after each registration stage, against known truth.

The truth is a per-slice sampling map ``W`` (see :mod:`datasets.misalignment`): moving-image
point -> the reference-frame point whose anatomy it shows. For a myocardium pixel ``q`` of the
output, a stage's sampling position ``p`` in the moving slice is correct when ``W(p) = q``; the
in-plane residual ``|W(p) - q|`` in mm is the alignment error that stage leaves.
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
                out[name][stage].append(np.linalg.norm(mapped - fixed_xy, axis=1))
    return {name: {stage: np.concatenate(values) if values else np.empty(0)
                   for stage, values in stages.items()} for name, stages in out.items()}
