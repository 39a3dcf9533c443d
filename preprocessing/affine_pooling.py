"""Pooling the per-slice affine fits of one sequence over its stack.

Every slice of bSSFP or T2w is fitted onto LGE on its own, and on real MyoPS 2020 slices each
such fit lands 1.5 to 1.8 mm from the truth (docs/registration.md). When the sequence moved as a
whole (the patient shifted between series), every slice carries the same misalignment, and
whatever part of that error is independent from slice to slice averages out over the stack.
When each slice moved on its own (breath-holds that differ), averaging would erase real motion.
Measured on real cases under a known whole-volume warp, pooling did not lower the Dice lost to
the misalignment (docs/misalignment.md): the fits' error there is mostly shared by the slices.
So ``slice`` is the default; the other modes are for data whose slices' fits scatter. Modes:

* ``slice``: each slice keeps its own fit (no pooling);
* ``stack``: one transform for the whole stack, the least-squares affine map that best
  reproduces every informative slice's fit over that slice's myocardium;
* ``shrink``: each slice's fit pulled toward the stack transform by a James-Stein factor
  ``1 - noise^2 / spread^2``, with ``spread`` the rms distance of the slices' fits from the
  stack transform over the myocardium and ``noise`` a slice fit's expected error: slices
  that disagree no more than noise would make share the stack transform; slices that
  disagree by much more keep most of their own motion.

A slice whose fit fell back to the identity (implausible or no heart) carries no evidence: it
is left out of the stack transform and receives it. Pooling moves transforms only; the metric
values in each result are still those of the slice's own fit.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from preprocessing.affine_registration import AffineResult
from preprocessing.transforms import Affine2D

AFFINE_POOLINGS: tuple[str, ...] = ("slice", "stack", "shrink")

#: Expected error (mm, rms over the myocardium) of one slice's fit: the consensus metric's
#: residual under a known warp on real MyoPS 2020 slices (docs/registration.md, 1.5 to 1.8 mm).
SLICE_NOISE_MM = 1.6


def _points(myocardium: np.ndarray) -> np.ndarray:
    """``[N, 2]`` (row, col) positions of the myocardium pixels of one slice."""
    return np.argwhere(np.asarray(myocardium) > 0).astype(np.float64)


def stack_transform(transforms: list[Affine2D], points: list[np.ndarray]) -> Affine2D:
    """The affine map closest, in least squares over every slice's ``points``, to each slice's
    transform there. Needs at least three non-collinear points in all."""
    sources = np.concatenate(points)
    targets = np.concatenate([t.apply(p) for t, p in zip(transforms, points, strict=True)])
    design = np.column_stack([sources, np.ones(len(sources))])
    if len(sources) < 3 or np.linalg.matrix_rank(design) < 3:
        raise ValueError("the stack transform needs three non-collinear myocardium points")
    solution, *_ = np.linalg.lstsq(design, targets, rcond=None)
    return Affine2D(solution[:2].T, solution[2])


def _blend(stack: Affine2D, own: Affine2D, weight: float) -> Affine2D:
    """``stack + weight (own - stack)``: the displacements blend linearly."""
    return Affine2D(stack.matrix + weight * (own.matrix - stack.matrix),
                    stack.offset + weight * (own.offset - stack.offset))


def _rms_distance(a: Affine2D, b: Affine2D, points: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.sum((a.apply(points) - b.apply(points)) ** 2, axis=1))))


def pool_affine_fits(fits: list[AffineResult], myocardium: np.ndarray, mode: str,
                     pixel_spacing_mm: float, noise_mm: float = SLICE_NOISE_MM
                     ) -> tuple[list[AffineResult], dict]:
    """``fits`` (one per slice of ``myocardium [D, H, W]``, on the same grid) pooled by
    ``mode``; and a record of what was done (mode, slices used, shrink weight)."""
    if mode not in AFFINE_POOLINGS:
        raise ValueError(f"affine pooling must be one of {AFFINE_POOLINGS}, got {mode!r}")
    myocardium = np.asarray(myocardium)
    if myocardium.ndim != 3 or len(myocardium) != len(fits):
        raise ValueError(f"need one myocardium slice per fit: {len(fits)} fits, "
                         f"myocardium {myocardium.shape}")
    if not (pixel_spacing_mm > 0 and noise_mm >= 0):
        raise ValueError(f"need pixel_spacing_mm > 0 and noise_mm >= 0, got "
                         f"{pixel_spacing_mm}, {noise_mm}")
    record: dict = {"mode": mode}
    if mode == "slice":
        return list(fits), record
    points = [_points(slice_) for slice_ in myocardium]
    used = [k for k, fit in enumerate(fits) if fit.model != "identity" and len(points[k])]
    record["slices_used"] = used
    if not used:
        return list(fits), record | {"skipped": "no slice with a fit and a myocardium"}
    try:
        stack = stack_transform([fits[k].transform for k in used], [points[k] for k in used])
    except ValueError as error:
        return list(fits), record | {"skipped": str(error)}
    record["stack_transform"] = stack.to_dict()
    weight = 0.0
    if mode == "shrink":
        spread_px = np.sqrt(np.mean([_rms_distance(fits[k].transform, stack, points[k]) ** 2
                                     for k in used]))
        spread_mm = float(spread_px * pixel_spacing_mm)
        weight = max(0.0, 1.0 - noise_mm ** 2 / spread_mm ** 2) if spread_mm > 0 else 0.0
        record |= {"spread_mm": spread_mm, "noise_mm": noise_mm, "weight": weight}
    pooled = [replace(fit, transform=_blend(stack, fit.transform, weight) if k in used
                      else stack)
              for k, fit in enumerate(fits)]
    return pooled, record
