"""nnU-Net v2 beside our networks: the same cases, the same folds, the same scorer.

    python -m baselines.nnunet export --raw_root /data/MyoPS2020 --work nnunet_work [--folds 5]
    python -m baselines.nnunet train --work nnunet_work --fold 0 [--epochs N | --minutes M]
    python -m baselines.nnunet score --work nnunet_work --raw_root /data/MyoPS2020

``export`` writes an nnU-Net raw dataset (``nnUNet_raw/Dataset<ID>_<name>``):
- one file per channel, ``imagesTr/<case>_0000.nii.gz`` (bSSFP), ``_0001`` (LGE), ``_0002`` (T2w);
- ``labelsTr/<case>.nii.gz`` in our training values (0 background, 1 normal myocardium, 2 scar,
  3 edema);
- ``dataset.json`` with those channel and label names;
- ``splits_final.json`` from :func:`datasets.folds.fold_cases`, so nnU-Net's folds are ours.

nnU-Net needs every channel on one grid. Each case's reference is chosen as our label-free path
chooses it (:func:`preprocessing.slice_matching.choose_reference`: fewest slices, ties to LGE),
and the other sequences are resampled onto it by world position (SimpleITK, linear). The label
is never read to make an input. When the label lies on another grid it is resampled onto the
reference for training (nearest), and predictions are mapped back onto the label's grid before
scoring.

``train`` runs the real nnunetv2 package (an optional extra: ``pip install -r
requirements-nnunet.txt``). It plans and preprocesses the 2d configuration once, trains one fold
with :class:`BudgetTrainer` under an epoch or wall-clock budget, and lets nnU-Net predict that
fold's held-out cases. These are our test cases of the fold, its "validation" set.

``score`` maps each fold's predictions onto the raw label grids and scores them with
:func:`evaluation.score_folder.score_folder`, the scorer of test.py's native numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from datasets.folds import fold_cases
from datasets.labels import CLASS_NAMES, MODALITIES, to_training_labels
from datasets.raw import CaseFiles, RawDataError, discover_cases, load_case
from evaluation.metrics import MetricAccumulator
from evaluation.score_folder import score_folder
from preprocessing.slice_matching import choose_reference
from utils import atomic_path, setup_logging, write_json

log = logging.getLogger("baselines.nnunet")

DATASET_ID = 501
DATASET_NAME = "MyoPS"
CONFIGURATION = "2d"
#: nnU-Net's channel index of each sequence: _0000 bSSFP, _0001 LGE, _0002 T2w.
CHANNELS = {name: index for index, name in enumerate(MODALITIES)}
#: Environment variables through which BudgetTrainer receives its budget.
ENV_EPOCHS, ENV_SECONDS, ENV_ITERATIONS = ("IMMSEG_NNUNET_EPOCHS", "IMMSEG_NNUNET_SECONDS",
                                          "IMMSEG_NNUNET_ITERATIONS")


def dataset_dir(work: str | Path) -> Path:
    return Path(work) / "nnUNet_raw" / f"Dataset{DATASET_ID:03d}_{DATASET_NAME}"


def _sitk():
    import SimpleITK as sitk

    return sitk


def _resampled(path: Path, reference: Any, label: bool) -> Any:
    """``path`` resampled onto ``reference``'s grid by world position (identity transform)."""
    sitk = _sitk()
    image = sitk.ReadImage(str(path), sitk.sitkUInt16 if label else sitk.sitkFloat32)
    if (image.GetSize() == reference.GetSize()
            and np.allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-3)
            and np.allclose(image.GetDirection(), reference.GetDirection(), atol=1e-6)
            and np.allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-6)):
        return image
    return sitk.Resample(image, reference, sitk.Transform(),
                         sitk.sitkNearestNeighbor if label else sitk.sitkLinear, 0.0,
                         image.GetPixelID())


def _write(image: Any, target: Path) -> None:
    with atomic_path(target) as tmp:
        _sitk().WriteImage(image, str(tmp), True)


def export_case(files: CaseFiles, images_dir: Path, labels_dir: Path | None) -> str:
    """Write one case's channels (and label) on its reference grid; returns the reference.

    The case is read with our readers first, so a bad file stops with its name.
    """
    sitk = _sitk()
    case = load_case(files)
    missing = [name for name in MODALITIES if name not in case.images]
    if missing:
        raise RawDataError(f"{files.case_id}: nnU-Net needs every sequence; missing {missing}")
    reference_name = choose_reference(case.images, prefer="LGE")
    reference = sitk.ReadImage(str(files.images[reference_name]), sitk.sitkFloat32)
    for name in MODALITIES:
        image = _resampled(files.images[name], reference, label=False)
        _write(image, images_dir / f"{files.case_id}_{CHANNELS[name]:04d}.nii.gz")
    if labels_dir is not None and case.label is not None:
        label = _resampled(files.label, reference, label=True)
        # Our training values (raw codes such as MyoPS 2020's 200/1220/2221 mapped), on the grid.
        values = sitk.GetArrayFromImage(label)
        mapped = sitk.GetImageFromArray(
            to_training_labels(values, source=str(files.label)).astype(np.uint8))
        mapped.CopyInformation(label)
        _write(sitk.Cast(mapped, sitk.sitkUInt8), labels_dir / f"{files.case_id}.nii.gz")
    return reference_name


def export_dataset(raw_root: str | Path, work: str | Path, folds: int = 5,
                   layout: str | None = None) -> Path:
    """Every labelled case of ``raw_root`` into the nnU-Net raw dataset under ``work``, with
    ``splits_final.json`` holding our ``folds`` (the held-out cases as nnU-Net's "val")."""
    cases = [c for c in discover_cases(raw_root, layout) if c.label is not None]
    if len(cases) < folds:
        raise RawDataError(f"{raw_root}: {len(cases)} labelled cases for {folds} folds")
    target = dataset_dir(work)
    images, labels = target / "imagesTr", target / "labelsTr"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    references = {}
    for files in cases:
        references[files.case_id] = export_case(files, images, labels)
        log.info("%s: exported on the %s grid", files.case_id, references[files.case_id])
    ids = sorted(references)
    write_json(target / "dataset.json", {
        "channel_names": {str(CHANNELS[name]): name for name in MODALITIES},
        "labels": {name: index for index, name in enumerate(CLASS_NAMES)},
        "numTraining": len(ids),
        "file_ending": ".nii.gz",
        "references": references,
    })
    write_json(target / "splits_final.json", splits(ids, folds))
    return target


def splits(case_ids: Sequence[str], folds: int) -> list[dict[str, list[str]]]:
    """nnU-Net's ``splits_final.json`` for our K folds: fold k trains on our fold k's training
    cases and holds out its test cases ("val")."""
    result = []
    for fold in range(folds):
        train, test = fold_cases(case_ids, folds, fold)
        result.append({"train": sorted(train), "val": sorted(test)})
    return result


# --------------------------------------------------------------------------------------------
# Training and prediction through nnunetv2


def _environment(work: Path) -> None:
    """nnU-Net reads its folders from the environment when imported: set them first. Its
    augmentation workers (``nnUNet_n_proc_DA``) default to 2 here, the cores of a small machine
    (nnU-Net also sizes a thread count from it, so 0 is refused)."""
    os.environ.setdefault("nnUNet_n_proc_DA", "2")
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (work / name).mkdir(parents=True, exist_ok=True)
        os.environ[name] = str((work / name).resolve())


def _require_nnunet() -> None:
    try:
        import nnunetv2  # noqa: F401
    except ImportError as error:
        raise RuntimeError("nnunetv2 is not installed: pip install -r requirements-nnunet.txt "
                           "(an optional extra)") from error


def budget_trainer_class() -> type:
    """:class:`nnUNetTrainer` with our budget: ``IMMSEG_NNUNET_EPOCHS`` epochs, stopping early
    after ``IMMSEG_NNUNET_SECONDS`` of training, ``IMMSEG_NNUNET_ITERATIONS`` iterations per
    epoch (nnU-Net's 250 by default). The schedule (poly over the epochs) is nnU-Net's; a
    wall-clock stop ends it where it is."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class BudgetTrainer(nnUNetTrainer):
        # nnU-Net records its constructor's arguments by name: the signature must be its own.
        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cuda")) -> None:  # noqa: B008
            super().__init__(plans, configuration, fold, dataset_json, device)
            if os.environ.get(ENV_EPOCHS):
                self.num_epochs = int(os.environ[ENV_EPOCHS])
            if os.environ.get(ENV_ITERATIONS):
                self.num_iterations_per_epoch = int(os.environ[ENV_ITERATIONS])
                self.num_val_iterations_per_epoch = max(
                    1, self.num_iterations_per_epoch // 5)
            self.budget_seconds = float(os.environ.get(ENV_SECONDS) or 0)

        def run_training(self) -> None:
            # nnU-Net's hooks in their order, with a wall-clock check after each epoch.
            start = time.perf_counter()
            self.on_train_start()
            for _ in range(self.current_epoch, self.num_epochs):
                self.on_epoch_start()
                self.on_train_epoch_start()
                losses = [self.train_step(next(self.dataloader_train))
                          for _ in range(self.num_iterations_per_epoch)]
                self.on_train_epoch_end(losses)
                with torch.no_grad():
                    self.on_validation_epoch_start()
                    outputs = [self.validation_step(next(self.dataloader_val))
                               for _ in range(self.num_val_iterations_per_epoch)]
                    self.on_validation_epoch_end(outputs)
                self.on_epoch_end()
                if self.budget_seconds and time.perf_counter() - start > self.budget_seconds:
                    self.print_to_log_file(f"wall-clock budget of {self.budget_seconds:.0f} s "
                                           "reached: training stops here")
                    break
            self.on_train_end()

    return BudgetTrainer


def train_fold(work: str | Path, fold: int, *, epochs: int | None = None,
               seconds: float | None = None, iterations: int | None = None,
               device: str = "cpu", processes: int = 2) -> Path:
    """Plan and preprocess (once), train ``fold`` under the budget, predict its held-out cases.

    Returns the folder of the fold's predictions (nnU-Net's ``validation``), on each case's
    reference grid.
    """
    work = Path(work).resolve()
    _environment(work)
    _require_nnunet()
    os.environ[ENV_EPOCHS] = str(epochs or "")
    os.environ[ENV_SECONDS] = str(seconds or "")
    os.environ[ENV_ITERATIONS] = str(iterations or "")
    import torch
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    name = maybe_convert_to_dataset_name(DATASET_ID)
    preprocessed = work / "nnUNet_preprocessed" / name
    if not (preprocessed / "nnUNetPlans.json").is_file():
        extract_fingerprints([DATASET_ID], num_processes=processes, check_dataset_integrity=True)
        plan_experiments([DATASET_ID])
        preprocess([DATASET_ID], configurations=(CONFIGURATION,), num_processes=(processes,))
    # Our folds, not nnU-Net's random ones.
    shutil.copyfile(dataset_dir(work) / "splits_final.json", preprocessed / "splits_final.json")
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False  # nnunetv2 >= 2.6 passes this flag inside the plans
    dataset_json = json.loads((preprocessed / "dataset.json").read_text())
    trainer = budget_trainer_class()(plans, CONFIGURATION, fold, dataset_json,
                                     device=torch.device(device))
    trainer.run_training()
    trainer.perform_actual_validation()
    return Path(trainer.output_folder) / "validation"


def collect_predictions(work: str | Path, raw_root: str | Path, out: str | Path,
                        layout: str | None = None) -> Path:
    """Every fold's predictions, mapped onto the raw label grids, into ``out`` (one map per
    case, ``<case>.nii.gz``), ready for :func:`evaluation.score_folder.score_folder`."""
    sitk = _sitk()
    found: dict[str, Path] = {}
    for path in sorted(Path(work).glob("nnUNet_results/*/*/fold_*/validation/*.nii.gz")):
        case = path.name[:-len(".nii.gz")]
        if case in found:
            raise RawDataError(f"{case}: predicted twice ({found[case]} and {path}); keep one "
                               "trainer's results under nnUNet_results")
        found[case] = path
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for files in discover_cases(raw_root, layout):
        if files.label is None or files.case_id not in found:
            continue
        truth = sitk.ReadImage(str(files.label))
        mapped = _resampled(found[files.case_id], truth, label=True)
        _write(sitk.Cast(mapped, sitk.sitkUInt8), out / f"{files.case_id}.nii.gz")
    return out


def score(work: str | Path, raw_root: str | Path, layout: str | None = None,
          folds: Sequence[int] | None = None) -> MetricAccumulator:
    """Out-of-fold scores with our scorer (native space): of every labelled case, or of the held-
    out cases of ``folds`` (an error names the cases whose fold has not been predicted)."""
    folder = collect_predictions(work, raw_root, Path(work) / "predictions", layout)
    only = None
    if folds is not None:
        split = json.loads((dataset_dir(work) / "splits_final.json").read_text())
        only = sorted(case for k in folds for case in split[k]["val"])
    metrics = score_folder(folder, raw_root, layout, only)
    metrics.write_json(Path(work) / "scores.json")
    metrics.write_csv(Path(work) / "per_case.csv")
    return metrics


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write the nnU-Net raw dataset and our folds")
    export.add_argument("--raw_root", required=True)
    export.add_argument("--work", required=True, help="nnU-Net's raw/preprocessed/results root")
    export.add_argument("--folds", type=int, default=5)
    export.add_argument("--layout", default=None)
    train = commands.add_parser("train", help="plan, preprocess, train one fold, predict it")
    train.add_argument("--work", required=True)
    train.add_argument("--fold", type=int, required=True)
    budget = train.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=int, default=None, help="nnU-Net's 1000 by default")
    budget.add_argument("--minutes", type=float, default=None, help="wall-clock budget")
    train.add_argument("--iterations", type=int, default=None,
                       help="iterations per epoch (nnU-Net's 250 by default)")
    train.add_argument("--device", default="cpu")
    scoring = commands.add_parser("score", help="score every fold predicted so far")
    scoring.add_argument("--work", required=True)
    scoring.add_argument("--raw_root", required=True)
    scoring.add_argument("--layout", default=None)
    scoring.add_argument("--folds", type=int, nargs="+", default=None,
                         help="only these folds' held-out cases (default: every case)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        if args.command == "export":
            print(export_dataset(args.raw_root, args.work, args.folds, args.layout))
        elif args.command == "train":
            print(train_fold(args.work, args.fold, epochs=args.epochs,
                             seconds=args.minutes * 60 if args.minutes else None,
                             iterations=args.iterations, device=args.device))
        else:
            print(score(args.work, args.raw_root, args.layout, args.folds).format_table())
    except (ValueError, RuntimeError, OSError) as error:
        log.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
