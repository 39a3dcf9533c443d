"""nnU-Net v2 beside our networks: the same cases, the same folds, the same scorer.

    python -m baselines.nnunet export --raw_root /data/MyoPS2020 --work nnunet_work [--folds 5]
    python -m baselines.nnunet export --processed_root data/myops2020 --work nnunet_work
    python -m baselines.nnunet train --work nnunet_work --fold 0 [--epochs N | --minutes M]
    python -m baselines.nnunet score --work nnunet_work [--folds 0 1]

``export`` writes an nnU-Net raw dataset from raw NIfTI or from our processed layout, with our
folds as ``splits_final.json`` (:mod:`baselines.nnunet_data`).

``train`` runs the real nnunetv2 package (an optional extra: ``pip install -r
requirements-nnunet.txt``). It plans and preprocesses the 2d configuration once, trains one fold
with :class:`BudgetTrainer` under an epoch or wall-clock budget, and lets nnU-Net predict that
fold's held-out cases (our test cases of the fold, its "validation" set), saving probabilities.
It resumes: a fold whose predictions are complete is left alone, a finished training is only
predicted, and a killed one continues from its last epoch with the budget it had left.

``score`` maps each fold's predictions back and scores them as test.py scores ours
(``<work>/test/summary.json``), so ``python -m bench.results_table`` tabulates both.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

from baselines.nnunet_data import (
    DATASET_ID,
    dataset_dir,
    export_processed,
    export_raw,
    score,
)
from utils import setup_logging, write_json

log = logging.getLogger("baselines.nnunet")

CONFIGURATION = "2d"
#: Environment variables through which BudgetTrainer receives its budget.
ENV_EPOCHS, ENV_SECONDS, ENV_ITERATIONS = ("IMMSEG_NNUNET_EPOCHS", "IMMSEG_NNUNET_SECONDS",
                                          "IMMSEG_NNUNET_ITERATIONS")
#: Beside nnU-Net's checkpoints: the wall-clock seconds a budgeted training has used.
BUDGET_FILE = "budget.json"
#: Written into nnU-Net's preprocessed folder once its fingerprint, plans and 2d data are done
#: (a run killed while preprocessing starts that step again).
CONFIGURATION_DONE = ".immseg_preprocessed"


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


def planned_epochs(done: int, elapsed: float, budget: float, cap: int) -> int:
    """How many epochs a wall-clock budget allows in total, from the mean epoch time so far.

    nnU-Net's poly schedule reaches zero at its last epoch; re-planning the last epoch after
    every epoch lets the learning rate anneal within the budget instead of being cut off at a
    high value. Never fewer than the epochs done (training stops there), never more than ``cap``.
    """
    if done <= 0 or elapsed <= 0:
        return cap
    remaining = max(0.0, budget - elapsed)
    return max(done, min(cap, done + math.floor(remaining / (elapsed / done))))


def budget_trainer_class() -> type:
    """:class:`nnUNetTrainer` with our budget: ``IMMSEG_NNUNET_EPOCHS`` epochs (a cap under a
    wall-clock budget), ``IMMSEG_NNUNET_SECONDS`` of training, ``IMMSEG_NNUNET_ITERATIONS``
    iterations per epoch (nnU-Net's 250 by default). Under a wall-clock budget the poly
    schedule's length is re-planned after each epoch (:func:`planned_epochs`). Under either
    budget a checkpoint is kept after every epoch (nnU-Net keeps one every 50, more than a
    short budget's whole training), so a killed training loses at most one epoch."""
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
            self.epoch_cap = self.num_epochs
            self.elapsed_before = 0.0
            self.save_every = 1

        def budget_path(self) -> Path:
            return Path(self.output_folder) / BUDGET_FILE

        def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
            super().load_checkpoint(filename_or_checkpoint)
            if self.budget_path().is_file():
                self.elapsed_before = float(json.loads(self.budget_path().read_text())["seconds"])
                self.replan(self.elapsed_before)  # the resumed epochs anneal as planned

        def replan(self, elapsed: float) -> None:
            if self.budget_seconds:
                self.num_epochs = planned_epochs(self.current_epoch, elapsed,
                                                 self.budget_seconds, self.epoch_cap)
                self.lr_scheduler.max_steps = self.num_epochs

        def run_training(self) -> None:
            # nnU-Net's hooks in their order, with the budget checked after each epoch.
            start = time.perf_counter() - self.elapsed_before
            self.on_train_start()
            while self.current_epoch < self.num_epochs:
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
                self.on_epoch_end()  # checkpoint_latest, then current_epoch += 1
                elapsed = time.perf_counter() - start
                write_json(self.budget_path(), {"seconds": elapsed,
                                                "epochs": self.current_epoch})
                self.replan(elapsed)
                if self.budget_seconds and self.current_epoch >= self.num_epochs:
                    self.print_to_log_file(
                        f"wall-clock budget of {self.budget_seconds:.0f} s reached after "
                        f"{self.current_epoch} epochs ({elapsed:.0f} s): training stops")
            self.on_train_end()

    return BudgetTrainer


def _predictions_complete(folder: Path, held_out: list[str]) -> bool:
    """Whether every held-out case has its prediction, and nnU-Net finished (its summary)."""
    return ((folder / "summary.json").is_file()
            and all((folder / f"{case}.nii.gz").is_file() for case in held_out))


def train_fold(work: str | Path, fold: int, *, epochs: int | None = None,
               seconds: float | None = None, iterations: int | None = None,
               device: str = "cpu", processes: int = 2) -> Path:
    """Plan and preprocess (once), train ``fold`` under the budget, predict its held-out cases.

    Returns the folder of the fold's predictions (nnU-Net's ``validation``, with ``.npz``
    probabilities), on each exported case's grid. Reruns resume (module docstring).
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
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    name = maybe_convert_to_dataset_name(DATASET_ID)
    preprocessed = work / "nnUNet_preprocessed" / name
    if not (preprocessed / CONFIGURATION_DONE).is_file():
        extract_fingerprints([DATASET_ID], num_processes=processes, check_dataset_integrity=True)
        plan_experiments([DATASET_ID])
        preprocess([DATASET_ID], configurations=(CONFIGURATION,), num_processes=(processes,))
        (preprocessed / CONFIGURATION_DONE).write_text("")
    # Our folds, not nnU-Net's random ones.
    shutil.copyfile(dataset_dir(work) / "splits_final.json", preprocessed / "splits_final.json")
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((preprocessed / "dataset.json").read_text())
    trainer_class = budget_trainer_class()

    def make(resume: bool):
        # nnunetv2 >= 2.6 passes "continue_training" inside the plans (it pops it).
        return trainer_class(dict(plans, continue_training=resume), CONFIGURATION, fold,
                             dataset_json, device=torch.device(device))

    output = Path(get_output_folder(DATASET_ID, trainer_class.__name__, "nnUNetPlans",
                                    CONFIGURATION, fold))
    final, latest = output / "checkpoint_final.pth", output / "checkpoint_latest.pth"
    held_out = json.loads((preprocessed / "splits_final.json").read_text())[fold]["val"]
    if final.is_file() and _predictions_complete(output / "validation", held_out):
        log.info("fold %d: already trained and predicted (%s)", fold, output)
        return output / "validation"
    if final.is_file():
        trainer = make(True)
        trainer.load_checkpoint(str(final))
        log.info("fold %d: trained; predicting its held-out cases", fold)
    else:
        resume = latest.is_file()
        trainer = make(resume)
        if resume:
            trainer.load_checkpoint(str(latest))
            log.info("fold %d: resuming after epoch %d (%.0f s of the budget used)", fold,
                     trainer.current_epoch, trainer.elapsed_before)
        trainer.run_training()
    trainer.perform_actual_validation(save_probabilities=True)
    return output / "validation"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write the nnU-Net raw dataset and our folds")
    source = export.add_mutually_exclusive_group(required=True)
    source.add_argument("--raw_root", help="raw NIfTI (MyoPS 2020 or MyoPS380 layout)")
    source.add_argument("--processed_root", help="our processed layout (its test volumes)")
    export.add_argument("--work", required=True, help="nnU-Net's raw/preprocessed/results root")
    export.add_argument("--folds", type=int, default=5)
    export.add_argument("--layout", default=None, help="raw layout, when not detected")
    train = commands.add_parser("train", help="plan, preprocess, train one fold, predict it")
    train.add_argument("--work", required=True)
    train.add_argument("--fold", type=int, required=True)
    train.add_argument("--epochs", type=int, default=None,
                       help="nnU-Net's 1000 by default; with --minutes, the most epochs")
    train.add_argument("--minutes", type=float, default=None, help="wall-clock training budget")
    train.add_argument("--iterations", type=int, default=None,
                       help="iterations per epoch (nnU-Net's 250 by default)")
    train.add_argument("--device", default="cpu")
    scoring = commands.add_parser("score", help="score every fold predicted so far")
    scoring.add_argument("--work", required=True)
    scoring.add_argument("--folds", type=int, nargs="+", default=None,
                         help="only these folds' held-out cases (default: every case)")
    scoring.add_argument("--output_dir", default=None, help="default: <work>/test")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        if args.command == "export":
            target = (export_raw(args.raw_root, args.work, args.folds, args.layout)
                      if args.raw_root else export_processed(args.processed_root, args.work,
                                                             args.folds))
            print(target)
        elif args.command == "train":
            print(train_fold(args.work, args.fold, epochs=args.epochs,
                             seconds=args.minutes * 60 if args.minutes else None,
                             iterations=args.iterations, device=args.device))
        else:
            print(score(args.work, args.folds, args.output_dir).headline.format_table())
    except (ValueError, RuntimeError, OSError) as error:
        log.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
