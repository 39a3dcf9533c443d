"""Segmentation metrics (Dice, HD95) and the accumulator shared by validation and test.

Empty-mask rule, applied identically by :func:`dice`, :func:`hd95`, :func:`group_scores` and
:class:`MetricAccumulator`:

* prediction and ground truth both empty -> Dice 1.0, HD95 0.0 (a correct "nothing here");
* exactly one of them empty -> Dice 0.0, HD95 = the diagonal of the volume's physical extent in mm,
  ``sqrt(sum((shape[i] * spacing[i]) ** 2))``. This is a finite worst case (no two voxels of the
  volume can be further apart), so per-group means and standard deviations stay defined and remain
  comparable between runs instead of silently dropping the hardest cases.

Each case's group volumes (prediction and label, mL) are kept beside its scores:
:meth:`MetricAccumulator.volume_agreement` summarises them and the burdens
(:mod:`evaluation.agreement`). A case whose label has no myocardium has no burden and is left out
of the burdens' agreement; one whose prediction has none counts as burden 0.

Masks or label volumes whose shapes differ raise ValueError; so does a spacing whose length does not
match the array rank or that holds non-positive values. Spacing is ordered like the array axes:
volumes are [D, H, W] with spacing (slice spacing, row spacing, column spacing).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from medpy.metric.binary import hd95 as _medpy_hd95

from datasets.labels import EVAL_GROUPS, burdens, group_volumes
from evaluation.agreement import agreement
from utils import aligned_rows, atomic_path, write_json

#: Metric names in the order they appear in rows, tables and files.
METRICS: tuple[str, ...] = ("dice", "hd95")
#: Per-case volume columns (mL) after the metrics: ``<group>_ml_pred``, ``<group>_ml_label``.
VOLUME_COLUMNS: tuple[str, ...] = ("ml_pred", "ml_label")


def _check_same_shape(pred: np.ndarray, gt: np.ndarray, what: str) -> None:
    if pred.shape != gt.shape:
        raise ValueError(f"{what}: prediction shape {pred.shape} != ground-truth shape {gt.shape}")


def _check_masks(pred: np.ndarray, gt: np.ndarray) -> None:
    _check_same_shape(pred, gt, "masks")
    for name, mask in (("pred", pred), ("gt", gt)):
        if mask.dtype != np.bool_:
            # Refusing label volumes here stops a silent "any label is foreground" reading.
            raise TypeError(f"{name} must be a boolean mask, got dtype {mask.dtype}")


def _check_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    values = tuple(float(s) for s in spacing)
    if len(values) != ndim:
        raise ValueError(f"spacing {values} has {len(values)} entries for a {ndim}-D array")
    if not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing must hold finite positive values, got {values}")
    return values


def worst_case_distance(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Diagonal of the volume's physical extent in mm: the HD95 penalty for one empty mask."""
    values = _check_spacing(spacing, len(shape))
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, values, strict=True))))


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice overlap of two boolean masks (1.0 when both are empty, see the module docstring)."""
    _check_masks(pred, gt)
    size_pred = int(np.count_nonzero(pred))
    size_gt = int(np.count_nonzero(gt))
    if size_pred + size_gt == 0:
        return 1.0
    overlap = int(np.count_nonzero(pred & gt))
    return 2.0 * overlap / (size_pred + size_gt)


def _union_box(pred: np.ndarray, gt: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of both masks.

    Every surface voxel of either mask lies inside it, and a voxel on the box's faces is a surface
    voxel whether or not the array continues beyond, so HD95 on the crop equals HD95 on the full
    volume while the distance transform only runs over the heart instead of the whole field of view.
    """
    union = pred | gt
    box = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        hits = np.flatnonzero(union.any(axis=other))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> float:
    """95th-percentile symmetric Hausdorff distance in mm between two boolean masks.

    ``spacing`` is ordered like the array axes. Empty masks follow the module-level rule.
    """
    _check_masks(pred, gt)
    values = _check_spacing(spacing, pred.ndim)
    has_pred, has_gt = bool(pred.any()), bool(gt.any())
    if not has_pred and not has_gt:
        return 0.0
    if has_pred != has_gt:
        return worst_case_distance(pred.shape, values)
    box = _union_box(pred, gt)
    return float(_medpy_hd95(pred[box], gt[box], voxelspacing=values))


def _check_groups(groups: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
    if not groups:
        raise ValueError("at least one evaluation group is required")
    checked = {}
    for name, labels in groups.items():
        if not labels:
            raise ValueError(f"evaluation group {name!r} has no labels")
        checked[str(name)] = tuple(int(label) for label in labels)
    return checked


def group_scores(
    pred_labels: np.ndarray,
    gt_labels: np.ndarray,
    spacing: Sequence[float],
    groups: Mapping[str, Sequence[int]] = EVAL_GROUPS,
) -> dict[str, dict[str, float]]:
    """Dice and HD95 per evaluation group; a group's foreground is the union of its labels."""
    _check_same_shape(pred_labels, gt_labels, "label volumes")
    values = _check_spacing(spacing, pred_labels.ndim)
    scores = {}
    for name, labels in _check_groups(groups).items():
        pred = np.isin(pred_labels, labels)
        gt = np.isin(gt_labels, labels)
        scores[name] = {"dice": dice(pred, gt), "hd95": hd95(pred, gt, values)}
    return scores


class MetricAccumulator:
    """Collects per-case group scores and summarises them (mean, std, n) per group and metric.

    Rows are kept per case id and reported sorted by it, so summaries and written files do not
    depend on the order in which cases were evaluated. Standard deviations are population values
    (``ddof=0``, as ``np.std``).
    """

    def __init__(self, groups: Mapping[str, Sequence[int]] = EVAL_GROUPS) -> None:
        self.groups = _check_groups(groups)
        self._rows: dict[str, dict[str, dict[str, float]]] = {}
        # case -> "ml_pred"/"ml_label" -> group -> mL
        self._volumes: dict[str, dict[str, dict[str, float]]] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def reset(self) -> None:
        """Forget every case (for reuse across validation epochs)."""
        self._rows.clear()
        self._volumes.clear()

    def update(
        self,
        case_id: str,
        pred_labels: np.ndarray,
        gt_labels: np.ndarray,
        spacing: Sequence[float],
    ) -> dict[str, dict[str, float]]:
        """Score one case and store it; returns its group scores."""
        if not isinstance(case_id, str) or not case_id:
            raise ValueError(f"case_id must be a non-empty string, got {case_id!r}")
        if case_id in self._rows:
            raise ValueError(f"case {case_id!r} was already scored")
        scores = group_scores(pred_labels, gt_labels, spacing, self.groups)
        self._rows[case_id] = scores
        self._volumes[case_id] = {"ml_pred": group_volumes(pred_labels, spacing, self.groups),
                                  "ml_label": group_volumes(gt_labels, spacing, self.groups)}
        return scores

    def extend(self, other: MetricAccumulator) -> None:
        """Take over ``other``'s cases (e.g. the folds of a cross-validation); a case scored in
        both, or other groups, is an error."""
        if other.groups != self.groups:
            raise ValueError(f"cannot merge scores of groups {list(other.groups)} into "
                             f"{list(self.groups)}")
        both = sorted(set(self._rows) & set(other._rows))
        if both:
            raise ValueError(f"case(s) {both} scored twice")
        self._rows.update(other._rows)
        self._volumes.update(other._volumes)

    def _columns(self) -> list[str]:
        return [*(f"{group}_{metric}" for group in self.groups for metric in METRICS),
                *(f"{group}_{column}" for group in self.groups for column in VOLUME_COLUMNS)]

    def per_case(self) -> list[dict]:
        """Flat rows sorted by case id: ``case``, ``<group>_dice``, ``<group>_hd95``, then each
        group's ``<group>_ml_pred`` and ``<group>_ml_label`` (mL)."""
        rows = []
        for case_id in sorted(self._rows):
            row: dict = {"case": case_id}
            for group, scores in self._rows[case_id].items():
                for metric in METRICS:
                    row[f"{group}_{metric}"] = scores[metric]
            volumes = self._volumes[case_id]
            for group in self.groups:
                for column in VOLUME_COLUMNS:
                    row[f"{group}_{column}"] = volumes[column][group]
            rows.append(row)
        return rows

    def _values(self, group: str, metric: str) -> np.ndarray:
        if not self._rows:
            raise ValueError("no cases have been scored yet")
        if group not in self.groups:
            raise ValueError(f"unknown group {group!r}; known: {list(self.groups)}")
        return np.array([self._rows[c][group][metric] for c in sorted(self._rows)], np.float64)

    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        """group -> metric -> {"mean", "std", "n"} over all scored cases."""
        result: dict[str, dict[str, dict[str, float]]] = {}
        for group in self.groups:
            result[group] = {}
            for metric in METRICS:
                values = self._values(group, metric)
                result[group][metric] = {"mean": float(values.mean()),
                                         "std": float(values.std()), "n": int(values.size)}
        return result

    def volume_agreement(self) -> dict[str, dict[str, float | int | None]]:
        """Prediction against label over the scored cases, for each group's volume (mL) and
        each burden (% of the whole myocardium) the groups allow:
        :func:`evaluation.agreement.agreement` (bias, limits of agreement, MAE, Pearson r)."""
        if not self._rows:
            raise ValueError("no cases have been scored yet")
        cases = sorted(self._volumes)
        result = {group: agreement([self._volumes[c]["ml_pred"][group] for c in cases],
                                   [self._volumes[c]["ml_label"][group] for c in cases])
                  for group in self.groups}
        pairs: dict[str, list[tuple[float, float]]] = {}
        for case in cases:
            predicted = burdens(self._volumes[case]["ml_pred"])
            for name, true in burdens(self._volumes[case]["ml_label"]).items():
                if true is not None:  # no myocardium in the label: no burden to match
                    pairs.setdefault(name, []).append((predicted[name] or 0.0, true))
        for name, values in pairs.items():
            result[name] = agreement([p for p, _ in values], [t for _, t in values])
        return result

    def mean_dice(self, groups: Sequence[str] = ("scar", "edema alone")) -> float:
        """Mean over ``groups`` of each group's mean Dice; the best-model selection score."""
        if isinstance(groups, str) or not groups:
            raise ValueError(f"groups must be a non-empty sequence of group names, got {groups!r}")
        return float(np.mean([self._values(group, "dice").mean() for group in groups]))

    def format_table(self) -> str:
        """Human-readable table: one row per group, Dice (%) and HD95 (mm) as mean ± std."""
        summary = self.summary()
        header = ("group", "Dice (%)", "HD95 (mm)")
        body = []
        for group, metrics in summary.items():
            d, h = metrics["dice"], metrics["hd95"]
            body.append((group, f"{100 * d['mean']:.2f} ± {100 * d['std']:.2f}",
                         f"{h['mean']:.2f} ± {h['std']:.2f}"))
        top, *lines = aligned_rows(header, body)
        rule = "-" * len(top)
        return "\n".join([top, rule, *lines, rule, f"n = {len(self)} cases"])

    def write_csv(self, path: str | os.PathLike[str]) -> None:
        """Write the per-case rows atomically (floats in full precision)."""
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["case", *self._columns()])
            writer.writeheader()
            writer.writerows(self.per_case())

    def results(self) -> dict[str, Any]:
        """``summary``, ``volumes`` (the volume agreement) and per-case ``cases``: what every
        results file of the framework holds for one set of scores."""
        return {"summary": self.summary(), "volumes": self.volume_agreement(),
                "cases": self.per_case()}

    def write_json(self, path: str | os.PathLike[str]) -> None:
        """Write groups and :meth:`results` atomically as one JSON document."""
        write_json(path, {"groups": {name: list(labels) for name, labels in self.groups.items()},
                          **self.results()})
