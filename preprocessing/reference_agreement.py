"""How precisely does a pre-aligned dataset define "aligned"? Independent estimators' agreement.

A known-warp test on real data (``bench_registration --source real``) scores a registration
against the alignment the data came with (MyoPS 2020 is distributed pre-aligned). That reference
has errors of its own, which the test counts against the registration. Their size can be
estimated without any truth from several independent registration metrics run on the unwarped
slices, in the way clock makers compare three clocks (the "three-cornered hat"). Each metric
``i`` finds, per slice, a heart offset ``x_i = g_i e + n_i`` from the reference: ``e`` is what
every metric sees (the reference's own offset from what the images show), ``g_i <= 1`` how fully
the metric follows it (below 1 for one that stops short, as a fit pulled toward the identity
does), ``n_i`` the metric's own noise. With the ``n_i`` independent of one another and of ``e``::

    E[x_i . x_j]   = g_i g_j E|e|^2  <=  E|e|^2                   (i != j)
    E|x_i - x_j|^2 = s_i^2 + s_j^2                                (equal gains)

So every pair's cross product gives the common rms offset as far as both metrics follow it: a
lower bound on the reference's own rms offset, which a registration that found exactly what the
images show would still be scored by the known-warp test. Two metrics whose noise is shared
(e.g. both read the same fixed image) raise their pair's value; keep such pairs apart.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from preprocessing.transforms import Affine2D


@dataclass(frozen=True)
class AgreementSplit:
    """Per-slice offsets of several estimators split into what they share and their own noise.

    Lengths are rms over the rows in the offsets' unit. ``pair_common`` holds each pair's common
    rms offset (``sqrt`` of its cross product, 0 when that is negative), ``common`` their
    mean-square combination (the classic hat, exact for equal gains), ``own_rms`` each
    estimator's own noise under equal gains; ``*_interval``: bootstrap 5-95 % over slices.
    """

    slices: int
    rms_offset: dict[str, float]
    pair_common: dict[str, float]
    pair_common_interval: dict[str, tuple[float, float]]
    common: float
    common_interval: tuple[float, float]
    own_rms: dict[str, float]

    def to_dict(self) -> dict:
        return {"slices": self.slices, "rms_offset": self.rms_offset,
                "pair_common": self.pair_common,
                "pair_common_interval": {k: list(v)
                                         for k, v in self.pair_common_interval.items()},
                "common": self.common, "common_interval": list(self.common_interval),
                "own_rms": self.own_rms}


def _rms(mean_squares: np.ndarray) -> np.ndarray:
    return np.sqrt(np.clip(mean_squares, 0.0, None))


def split_agreement(offsets: Mapping[str, np.ndarray], *, groups: np.ndarray | None = None,
                    bootstrap: int = 1000, seed: int = 0) -> AgreementSplit:
    """Split the estimators' offsets ``name -> [N, 2]`` (at least three, same rows).

    Rows are slices (:func:`heart_offsets`) or points (:func:`myocardial_offsets`); ``groups
    [N]`` then names each point's slice, so that the bootstrap redraws whole slices (the unit
    whose errors are independent). ``slices`` in the result counts the groups.
    """
    names = list(offsets)
    if len(names) < 3:
        raise ValueError(f"need at least three estimators to separate their noise, got {names}")
    arrays = [np.asarray(offsets[name], np.float64) for name in names]
    shape = arrays[0].shape
    if len(shape) != 2 or shape[1] != 2 or shape[0] < 2:
        raise ValueError(f"offsets must be [N, 2] with N >= 2, got {shape} for {names[0]!r}")
    for name, array in zip(names, arrays, strict=True):
        if array.shape != shape:
            raise ValueError(f"offsets of {name!r} are {array.shape}, expected {shape}")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"offsets of {name!r} are not all finite")
    if groups is None:
        groups = np.arange(shape[0])
    groups = np.asarray(groups)
    if groups.shape != (shape[0],):
        raise ValueError(f"groups must be [{shape[0]}], got {groups.shape}")
    _, group_index = np.unique(groups, return_inverse=True)
    count = int(group_index.max()) + 1
    pairs = list(itertools.combinations(range(len(names)), 2))
    labels = [f"{names[i]} x {names[j]}" for i, j in pairs]
    # Per-group sums of every pair's dot products: any redraw of groups is a ratio of sums.
    sums = np.zeros((count, len(pairs)))
    for k, (i, j) in enumerate(pairs):
        np.add.at(sums[:, k], group_index, (arrays[i] * arrays[j]).sum(axis=1))
    sizes = np.bincount(group_index, minlength=count).astype(np.float64)
    cross = sums.sum(axis=0) / sizes.sum()
    rng = np.random.default_rng(seed)
    draws = np.empty((bootstrap, len(pairs)))
    for b in range(bootstrap):
        chosen = rng.integers(0, count, count)
        draws[b] = sums[chosen].sum(axis=0) / sizes[chosen].sum()

    def interval(values: np.ndarray) -> tuple[float, float]:
        if not bootstrap:
            return (math.nan, math.nan)
        low, high = np.percentile(values, [5, 95])
        return float(low), float(high)

    # Own noise: s_i^2 + s_j^2 = E|x_i - x_j|^2 over all pairs, by least squares.
    design = np.zeros((len(pairs), len(names)))
    spread = np.empty(len(pairs))
    for row, (i, j) in enumerate(pairs):
        design[row, [i, j]] = 1.0
        spread[row] = ((arrays[i] - arrays[j]) ** 2).sum(axis=1).mean()
    own, *_ = np.linalg.lstsq(design, spread, rcond=None)
    return AgreementSplit(
        slices=count,
        rms_offset={name: float(np.sqrt((array ** 2).sum(axis=1).mean()))
                    for name, array in zip(names, arrays, strict=True)},
        pair_common=dict(zip(labels, _rms(cross).tolist(), strict=True)),
        pair_common_interval={label: interval(_rms(draws[:, k]))
                              for k, label in enumerate(labels)},
        common=float(_rms(cross.mean())),
        common_interval=interval(_rms(draws.mean(axis=1))),
        own_rms=dict(zip(names, _rms(own).tolist(), strict=True)))


def myocardial_offsets(transforms: Sequence[Affine2D], myocardium: np.ndarray,
                       spacing_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Where each slice's transform puts every myocardium pixel, relative to it: ``[P, 2]`` mm
    ``(row, col)``, and each point's slice ``[P]``: the offset field the known-warp test
    averages over."""
    myocardium = np.asarray(myocardium, bool)
    if len(transforms) != len(myocardium):
        raise ValueError(f"{len(transforms)} transforms for {len(myocardium)} masks")
    offsets, slices = [], []
    for k, (transform, mask) in enumerate(zip(transforms, myocardium, strict=True)):
        points = np.argwhere(mask).astype(np.float64)
        offsets.append((points @ transform.matrix.T + transform.offset - points) * spacing_mm)
        slices.append(np.full(len(points), k))
    return np.concatenate(offsets), np.concatenate(slices)


def heart_offsets(transforms: Sequence[Affine2D], masks: np.ndarray,
                  spacing_mm: float) -> np.ndarray:
    """Where each slice's transform puts the centre of its mask, relative to it: ``[N, 2]`` mm
    ``(row, col)``. The heart's own displacement, whatever rotation comes with it; for an affine
    map, the mean of the mask's :func:`myocardial_offsets`."""
    offsets, slices = myocardial_offsets(transforms, masks, spacing_mm)
    sizes = np.bincount(slices, minlength=len(transforms))
    if not sizes.all():
        raise ValueError(f"slice {int(np.argmin(sizes))}: empty mask has no centre")
    return np.stack([np.bincount(slices, offsets[:, axis], len(transforms))
                     for axis in (0, 1)], axis=1) / sizes[:, None]
