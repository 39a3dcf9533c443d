"""Checkpoint loading and held-out evaluation for test.py: scores, subsets, files, box plots.

Besides the full input, a network can be scored on any subset of the sequences (the others
zeroed and masked as :mod:`networks.sequences` defines): :func:`evaluate_subsets` reads each
volume once and predicts it once per subset, which is how robustness to missing sequences is
reported.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from datasets.dataset import TestVolume, iter_test_volumes
from datasets.labels import MODALITIES
from datasets.processed import ProcessedLayout
from datasets.raw import nifti_image
from evaluation.inference import predict_volume
from evaluation.metrics import MetricAccumulator
from evaluation.plots import dice_boxplot, dice_by_group
from networks.sequences import check_model_inputs, parse_sequences
from networks.variants import input_size, network_from_record
from trainer import CHECKPOINT_FINAL
from utils import atomic_path, read_checkpoint, write_json

log = logging.getLogger(__name__)

_REQUIRED_KEYS = ("network", "model")

#: Joins sequence names into a subset's label (``LGE+T2w``), used for table rows and folders.
SUBSET_SEPARATOR = "+"


@dataclass(frozen=True)
class LoadedCheckpoint:
    model: nn.Module
    payload: dict

    @property
    def img_size(self) -> int:
        return input_size(self.model)


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """``--checkpoint FILE`` or ``--run_dir DIR`` (one required), for test.py and predict.py."""
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--checkpoint", help="checkpoint file written by train.py")
    where.add_argument("--run_dir", help=f"run folder of train.py (uses {CHECKPOINT_FINAL})")


def checkpoint_path(args: argparse.Namespace) -> Path:
    """The checkpoint named by :func:`add_checkpoint_arguments`' flags."""
    return Path(args.checkpoint or Path(args.run_dir) / CHECKPOINT_FINAL)


def load_checkpoint(path: str | Path, device: torch.device) -> LoadedCheckpoint:
    """Rebuild the network described inside a checkpoint and load its weights (eval mode)."""
    path = Path(path)
    payload = read_checkpoint(path)
    if "network" not in payload and {"model_name", "model_config"} <= set(payload):
        # Written before variants existed: always an early-fusion TransUNet.
        payload["network"] = {"variant": "transunet", "name": payload["model_name"],
                              "config": payload["model_config"]}
    missing = [key for key in _REQUIRED_KEYS if key not in payload]
    if missing:
        raise ValueError(f"{path}: not a checkpoint of this framework (missing {missing})")
    try:
        model = network_from_record(payload["network"], payload["model"])
    except (ValueError, KeyError, RuntimeError) as error:
        raise ValueError(f"{path}: cannot rebuild its network ({error})") from error
    return LoadedCheckpoint(model.to(device).eval(), payload)


def all_subsets(known: Sequence[str] = MODALITIES) -> list[tuple[str, ...]]:
    """Every non-empty subset of ``known`` in channel order, smallest first (7 for 3 sequences)."""
    return [subset for size in range(1, len(known) + 1)
            for subset in itertools.combinations(tuple(known), size)]


def subset_label(subset: Sequence[str]) -> str:
    """``("LGE", "T2w")`` -> ``"LGE+T2w"``: a row name and a folder name."""
    return SUBSET_SEPARATOR.join(subset)


def evaluate_subsets(model: nn.Module, layout: ProcessedLayout, names: list[str], img_size: int,
                     device: torch.device, subsets: Sequence[Sequence[str]], *,
                     batch_size: int = 32, tta: bool = False,
                     prediction_dirs: Mapping[tuple[str, ...], Path] | None = None,
                     reference_dir: Path | None = None,
                     ) -> dict[tuple[str, ...], MetricAccumulator]:
    """Score every listed test volume once per sequence subset (each volume is read once).

    ``prediction_dirs`` maps a subset to the folder that receives its ``<name>_pred`` NIfTI
    files; subsets missing from it write none. The label and the inputs, the same for every
    subset, go once per volume to ``reference_dir`` (:func:`write_reference_nifti`); without it,
    beside each subset's predictions.
    """
    checked = [parse_sequences(subset) for subset in subsets]
    if not checked:
        raise ValueError("at least one sequence subset is required")
    if len(set(checked)) != len(checked):
        raise ValueError(f"a sequence subset is listed twice in {checked}")
    for subset in checked:
        check_model_inputs(model, subset)
    prediction_dirs = {parse_sequences(subset): Path(folder)
                       for subset, folder in (prediction_dirs or {}).items()}
    reference_dirs = ([Path(reference_dir)] if reference_dir is not None
                      else sorted(set(prediction_dirs.values())))
    results = {subset: MetricAccumulator() for subset in checked}
    model.eval()
    for volume in tqdm(iter_test_volumes(layout, names), total=len(names), desc="test",
                       unit="volume"):
        for directory in reference_dirs:
            write_reference_nifti(directory, volume)
        for subset in checked:
            prediction = predict_volume(model, volume.image, img_size, device, batch_size,
                                        tta=tta, sequences=subset)
            results[subset].update(volume.name, prediction, volume.label, volume.spacing)
            if subset in prediction_dirs:
                write_prediction_nifti(prediction_dirs[subset], volume, prediction)
    return results


def evaluate(model: nn.Module, layout: ProcessedLayout, names: list[str], img_size: int,
             device: torch.device, *, batch_size: int = 32,
             prediction_dir: Path | None = None, tta: bool = False,
             sequences: Sequence[str] | None = None) -> MetricAccumulator:
    """Predict every listed test volume, score it, optionally write NIfTI files.

    ``sequences`` names the sequences the network may read (None: all of them).
    """
    subset = parse_sequences(MODALITIES if sequences is None else sequences)
    dirs = None if prediction_dir is None else {subset: Path(prediction_dir)}
    return evaluate_subsets(model, layout, names, img_size, device, [subset],
                            batch_size=batch_size, tta=tta, prediction_dirs=dirs)[subset]


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


def write_prediction_nifti(directory: Path, volume: TestVolume, prediction: np.ndarray) -> Path:
    """Write ``<name>_pred.nii.gz`` on the geometry of :func:`write_reference_nifti`."""
    if prediction.shape != volume.label.shape:
        raise ValueError(f"{volume.name}: prediction shape {prediction.shape} != label shape "
                         f"{volume.label.shape}")
    path = Path(directory) / f"{volume.name}_pred.nii.gz"
    write_nifti(path, prediction.astype(np.uint8), volume.spacing)
    return path


def write_reference_nifti(directory: Path, volume: TestVolume) -> list[Path]:
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


def write_results(directory: Path, metrics: MetricAccumulator, settings: Mapping[str, Any], *,
                  title: str = "") -> None:
    """``per_case.csv``, ``summary.json`` (with the settings used) and ``dice_boxplot.png``."""
    directory = Path(directory)
    metrics.write_csv(directory / "per_case.csv")
    write_json(directory / "summary.json", {
        "groups": {name: list(labels) for name, labels in metrics.groups.items()},
        "summary": metrics.summary(), "cases": metrics.per_case(), "settings": dict(settings)})
    dice_boxplot(dice_by_group(metrics), directory / "dice_boxplot.png", title=title)


def subset_rows(results: Mapping[tuple[str, ...], MetricAccumulator]) -> list[dict[str, Any]]:
    """One row per subset: ``subset``, ``n`` and, per group, ``<group>_dice_mean``/``_std``."""
    rows = []
    for subset, metrics in results.items():
        summary = metrics.summary()
        row: dict[str, Any] = {"subset": subset_label(subset), "n": len(metrics)}
        for group, scores in summary.items():
            row[f"{group}_dice_mean"] = scores["dice"]["mean"]
            row[f"{group}_dice_std"] = scores["dice"]["std"]
        rows.append(row)
    return rows


def write_subset_table(directory: Path, results: Mapping[tuple[str, ...], MetricAccumulator],
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
                     "summary": metrics.summary()} for subset, metrics in results.items()]})


def format_subset_table(results: Mapping[tuple[str, ...], MetricAccumulator]) -> str:
    """Mean Dice (%) per subset (rows) and group (columns)."""
    rows = subset_rows(results)
    if not rows:
        raise ValueError("no subset results to format")
    groups = list(next(iter(results.values())).groups)
    header = ["sequences", *groups]
    body = [[row["subset"], *(f"{100 * row[f'{group}_dice_mean']:.2f}" for group in groups)]
            for row in rows]
    widths = [max(len(line[i]) for line in (header, *body)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join([cells[0].ljust(widths[0]),
                          *(c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))])

    rule = "-" * len(line(header))
    return "\n".join(["Dice (%) by sequence subset", line(header), rule,
                      *(line(cells) for cells in body), rule,
                      f"n = {rows[0]['n']} cases per subset"])
