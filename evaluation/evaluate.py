"""Checkpoint loading and held-out evaluation for test.py: scores, subsets, files, box plots.

Besides the full input, a network can be scored on any subset of the sequences (the others
zeroed and masked as :mod:`networks.sequences` defines): :func:`evaluate_subsets` reads each
volume once and predicts it once per subset, which is how robustness to missing sequences is
reported.
"""

from __future__ import annotations

import csv
import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from datasets.labels import MODALITIES
from datasets.processed import ProcessedLayout
from datasets.raw import Volume, nifti_image
from evaluation.metrics import MetricAccumulator
from evaluation.plots import dice_boxplot, dice_by_group
from evaluation.test_cases import TestCase, iter_test_cases
from networks.inference import predict_volume
from networks.sequences import check_model_inputs, parse_sequences
from prediction.native import labels_from_probabilities, probabilities_to_native
from prediction.pipeline import PredictConfig, Registration, predict_stacks
from utils import aligned_rows, atomic_path, write_json

log = logging.getLogger(__name__)

#: Joins sequence names into a subset's label (``LGE+T2w``), used for table rows and folders.
SUBSET_SEPARATOR = "+"


def all_subsets(known: Sequence[str] = MODALITIES) -> list[tuple[str, ...]]:
    """Every non-empty subset of ``known`` in channel order, smallest first (7 for 3 sequences)."""
    return [subset for size in range(1, len(known) + 1)
            for subset in itertools.combinations(tuple(known), size)]


def subset_label(subset: Sequence[str]) -> str:
    """``("LGE", "T2w")`` -> ``"LGE+T2w"``: a row name and a folder name."""
    return SUBSET_SEPARATOR.join(subset)


@dataclass
class Scores:
    """One subset's scores: ``grid`` on the processed grid (every case), ``native`` on the
    labelled sequence's native grid (label-free cases whose raw files are at hand), and the
    cases whose ROI was given rather than found."""

    grid: MetricAccumulator = field(default_factory=MetricAccumulator)
    native: MetricAccumulator = field(default_factory=MetricAccumulator)
    roi_given: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.grid)

    @property
    def space(self) -> str:
        """``native`` when every case was scored there, else ``grid``: what tables report."""
        return "native" if len(self.grid) and len(self.native) == len(self.grid) else "grid"

    @property
    def headline(self) -> MetricAccumulator:
        return self.native if self.space == "native" else self.grid

    def extend(self, other: Scores) -> None:
        """Add ``other``'s cases (another fold's)."""
        self.grid.extend(other.grid)
        self.native.extend(other.native)
        self.roi_given.extend(other.roi_given)

    @property
    def where(self) -> str:
        """Where the headline numbers were scored, in words."""
        return ("native space (the labelled sequence's grid and spacing, raw label)"
                if self.space == "native" else "processed grid")

    def describe(self) -> str:
        """How the headline numbers were obtained, for tables and JSON."""
        given = (f"; ROI given for {len(self.roi_given)} of {len(self.grid)} cases"
                 if self.roi_given else "; label-free (heart found by the network)")
        return f"{self.where}{given}"


def evaluate_subsets(model: nn.Module, layout: ProcessedLayout, names: list[str], img_size: int,
                     device: torch.device, subsets: Sequence[Sequence[str]], *,
                     batch_size: int = 32, tta: bool = False,
                     config: PredictConfig | None = None,
                     networks: Registration | None = None,
                     prediction_dirs: Mapping[tuple[str, ...], Path] | None = None,
                     reference_dir: Path | None = None,
                     ) -> dict[tuple[str, ...], Scores]:
    """Score every listed test volume once per sequence subset (each volume is read once).

    Label-free volumes go through :func:`prediction.pipeline.predict_stacks` with ``config``
    (default: :class:`PredictConfig` with ``batch_size`` and ``tta``); volumes whose ROI was
    given are predicted as they are. ``prediction_dirs`` maps a subset to the folder that
    receives its ``<name>_pred`` NIfTI files (processed grid) and ``<name>_native_pred`` (on the
    labelled sequence's native grid); subsets missing from it write none. The label and the
    inputs, the same for every subset, go once per volume to ``reference_dir``
    (:func:`write_reference_nifti`); without it, beside each subset's predictions.
    """
    checked = [parse_sequences(subset) for subset in subsets]
    if not checked:
        raise ValueError("at least one sequence subset is required")
    if len(set(checked)) != len(checked):
        raise ValueError(f"a sequence subset is listed twice in {checked}")
    for subset in checked:
        check_model_inputs(model, subset)
    config = config or PredictConfig(batch_size=batch_size, tta=tta)
    prediction_dirs = {parse_sequences(subset): Path(folder)
                       for subset, folder in (prediction_dirs or {}).items()}
    reference_dirs = ([Path(reference_dir)] if reference_dir is not None
                      else sorted(set(prediction_dirs.values())))
    results = {subset: Scores() for subset in checked}
    model.eval()
    for case in tqdm(iter_test_cases(layout, names), total=len(names), desc="test",
                     unit="volume"):
        for directory in reference_dirs:
            write_reference_nifti(directory, case)
        for subset in checked:
            grid, native = predict_case(model, case, img_size, device, subset, config, networks)
            scores = results[subset]
            scores.grid.update(case.name, grid, case.label, case.spacing)
            if case.roi_given:
                scores.roi_given.append(case.name)
            if native is not None:  # the case's raw label and grid are at hand
                scores.native.update(case.name, native, case.native.label.array,
                                     case.native.spacing)
            if subset in prediction_dirs:
                write_prediction_nifti(prediction_dirs[subset], case, grid)
                if native is not None:
                    write_native_nifti(prediction_dirs[subset] / f"{case.name}_native_pred.nii.gz",
                                       native, case.native.volume)
    return results


def predict_case(model: nn.Module, case: TestCase, img_size: int, device: torch.device,
                 subset: Sequence[str], config: PredictConfig,
                 networks: Registration | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """``(grid labels [D, H, W], native labels [Z, Y, X] or None)`` for one test case.

    A label-free case goes through the prediction path of new patients; its label is not read.
    """
    if case.stacks is None:
        return predict_volume(model, case.image, img_size, device, config.batch_size,
                              tta=config.tta, sequences=subset), None
    # A case lacking a sequence (preprocessed with --allow_missing) is given what it has.
    given = [name for name in subset if name in case.stacks.present]
    if not given:
        raise ValueError(f"{case.name}: has none of the sequences {list(subset)}")
    stacks = case.stacks.with_sequences(given)
    result = predict_stacks(model, img_size, stacks, config, device, networks)
    grid = result.grid_labels(stacks.images.shape[-1])
    if case.native is None:
        return grid, None
    native = probabilities_to_native(result.probabilities, case.native.volume,
                                     case.native.slices, stacks.grids, result.location.origin)
    return grid, labels_from_probabilities(native)


def evaluate(model: nn.Module, layout: ProcessedLayout, names: list[str], img_size: int,
             device: torch.device, *, batch_size: int = 32,
             prediction_dir: Path | None = None, tta: bool = False,
             sequences: Sequence[str] | None = None,
             config: PredictConfig | None = None) -> Scores:
    """Predict every listed test volume, score it, optionally write NIfTI files.

    ``sequences`` names the sequences the network may read (None: all of them).
    """
    subset = parse_sequences(MODALITIES if sequences is None else sequences)
    dirs = None if prediction_dir is None else {subset: Path(prediction_dir)}
    return evaluate_subsets(model, layout, names, img_size, device, [subset],
                            batch_size=batch_size, tta=tta, config=config,
                            prediction_dirs=dirs)[subset]


def write_native_nifti(path: Path, labels: np.ndarray, volume: Volume) -> None:
    """A ``[Z, Y, X]`` label map on ``volume``'s native grid (its shape and affine)."""
    with atomic_path(path) as tmp:
        nifti_image(labels.transpose(2, 1, 0).astype(np.uint8), volume.affine).to_filename(
            str(tmp))


def volume_affine(spacing: Sequence[float]) -> np.ndarray:
    """Voxel-to-mm affine of a ``[D, H, W]`` array stored transposed as ``[W, H, D]`` (x, y, z).

    Every file written for one volume uses this one affine, so viewers overlay them exactly.
    """
    if len(spacing) != 3 or not all(float(s) > 0 for s in spacing):
        raise ValueError(f"spacing must be three positive values, got {tuple(spacing)}")
    return np.diag([float(spacing[2]), float(spacing[1]), float(spacing[0]), 1.0])


def write_nifti(path: Path, volume: np.ndarray, spacing: Sequence[float]) -> None:
    """Write a ``[D, H, W]`` array as NIfTI with the given (slice, row, column) spacing."""
    if volume.ndim != 3:
        raise ValueError(f"expected a [D, H, W] array, got shape {volume.shape}")
    image = nifti_image(volume.transpose(2, 1, 0), volume_affine(spacing))
    with atomic_path(path) as tmp:
        image.to_filename(str(tmp))


def write_prediction_nifti(directory: Path, volume: TestCase, prediction: np.ndarray) -> Path:
    """Write ``<name>_pred.nii.gz`` on the geometry of :func:`write_reference_nifti`."""
    if prediction.shape != volume.label.shape:
        raise ValueError(f"{volume.name}: prediction shape {prediction.shape} != label shape "
                         f"{volume.label.shape}")
    path = Path(directory) / f"{volume.name}_pred.nii.gz"
    write_nifti(path, prediction.astype(np.uint8), volume.spacing)
    return path


def write_reference_nifti(directory: Path, volume: TestCase) -> list[Path]:
    """Write ``<name>_gt`` and ``<name>_<sequence>`` (each input) as NIfTI.

    The inputs are written as stored (in [0, 1]), all three, so that a prediction made without a
    sequence can still be checked against it. Returns the written paths.
    """
    if volume.image.shape[1] != len(MODALITIES):
        raise ValueError(f"{volume.name}: expected {len(MODALITIES)} sequences, got image "
                         f"{volume.image.shape}")
    arrays = {"gt": volume.label.astype(np.uint8)}
    for index, sequence in enumerate(MODALITIES):
        arrays[sequence] = volume.image[:, index].astype(np.float32)
    paths = []
    for suffix, array in arrays.items():
        path = Path(directory) / f"{volume.name}_{suffix}.nii.gz"
        write_nifti(path, array, volume.spacing)
        paths.append(path)
    return paths


def write_results(directory: Path, scores: Scores, settings: Mapping[str, Any], *,
                  title: str = "", obtained: str | None = None) -> None:
    """``per_case.csv`` (processed grid), ``native_per_case.csv`` (when scored there),
    ``summary.json`` (both summaries and volume agreements, the settings and how the numbers
    were obtained: ``obtained`` or :meth:`Scores.describe`) and ``dice_boxplot.png`` (the
    headline scores)."""
    directory = Path(directory)
    scores.grid.write_csv(directory / "per_case.csv")
    if len(scores.native):
        scores.native.write_csv(directory / "native_per_case.csv")
    headline = scores.headline
    spaces = {"grid": scores.grid.results(),
              "native": scores.native.results() if len(scores.native) else None}
    write_json(directory / "summary.json", {
        "groups": {name: list(labels) for name, labels in headline.groups.items()},
        "space": scores.space, "obtained": obtained or scores.describe(),
        "roi_given": scores.roi_given, **spaces[scores.space], **spaces,
        "settings": dict(settings)})
    dice_boxplot(dice_by_group(headline), directory / "dice_boxplot.png", title=title)


def subset_rows(results: Mapping[tuple[str, ...], Scores]) -> list[dict[str, Any]]:
    """One row per subset: ``subset``, ``space``, ``n`` and, per group,
    ``<group>_dice_mean``/``_std`` of the headline scores."""
    rows = []
    for subset, scores in results.items():
        metrics = scores.headline
        summary = metrics.summary()
        row: dict[str, Any] = {"subset": subset_label(subset), "space": scores.space,
                               "n": len(metrics)}
        for group, scores in summary.items():
            row[f"{group}_dice_mean"] = scores["dice"]["mean"]
            row[f"{group}_dice_std"] = scores["dice"]["std"]
        rows.append(row)
    return rows


def write_subset_table(directory: Path, results: Mapping[tuple[str, ...], Scores],
                       settings: Mapping[str, Any]) -> None:
    """``subsets.csv`` (the rows of :func:`subset_rows`) and ``subsets.json`` (full summaries)."""
    rows = subset_rows(results)
    if not rows:
        raise ValueError("no subset results to write")
    directory = Path(directory)
    with atomic_path(directory / "subsets.csv") as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    # A list, not a mapping: the JSON writer sorts keys, and the order (by size) is meaningful.
    write_json(directory / "subsets.json", {
        "settings": dict(settings),
        "subsets": [{"subset": subset_label(subset), "sequences": list(subset),
                     "space": scores.space, "summary": scores.headline.summary()}
                    for subset, scores in results.items()]})


def format_subset_table(results: Mapping[tuple[str, ...], Scores]) -> str:
    """Mean Dice (%) per subset (rows) and group (columns)."""
    rows = subset_rows(results)
    if not rows:
        raise ValueError("no subset results to format")
    groups = list(next(iter(results.values())).headline.groups)
    header = ["sequences", *groups]
    body = [[row["subset"], *(f"{100 * row[f'{group}_dice_mean']:.2f}" for group in groups)]
            for row in rows]
    top, *lines = aligned_rows(header, body)
    rule = "-" * len(top)
    return "\n".join(["Dice (%) by sequence subset", top, rule, *lines, rule,
                      f"n = {rows[0]['n']} cases per subset"])
