"""BudgetTrainer's loop, budget file and resume, on a stand-in for nnU-Net's trainer.

nnunetv2 is an optional extra, so its ``nnUNetTrainer`` is replaced by a class with the hooks
BudgetTrainer calls and nnunetv2 2.8's checkpoint rule: ``on_epoch_end`` saves
``checkpoint_latest`` when ``(epoch + 1) % save_every == 0`` except in the last epoch, then
counts the epoch. That rule kept no checkpoint at all in a 13-epoch budget before
``save_every`` was set to 1 under every budget.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from baselines import nnunet


class StandInTrainer:
    """The part of ``nnUNetTrainer`` that BudgetTrainer relies on."""

    def __init__(self, plans, configuration, fold, dataset_json, device=None):
        self.output_folder = plans["output_folder"]
        self.num_epochs, self.num_iterations_per_epoch = 1000, 250
        self.num_val_iterations_per_epoch, self.save_every = 50, 50
        self.current_epoch = 0
        self.lr_scheduler = types.SimpleNamespace(max_steps=1000)
        self.dataloader_train = self.dataloader_val = iter(int, 1)  # endless zeros
        self.calls: list[str] = []
        self.checkpoints: list[int] = []

    def on_train_start(self):
        self.calls.append("train_start")

    def on_epoch_start(self):
        pass

    def on_train_epoch_start(self):
        pass

    def train_step(self, batch):
        self.calls.append("train_step")
        return {"loss": 0.0}

    def on_train_epoch_end(self, outputs):
        pass

    def on_validation_epoch_start(self):
        pass

    def validation_step(self, batch):
        self.calls.append("val_step")
        return {}

    def on_validation_epoch_end(self, outputs):
        pass

    def on_epoch_end(self):
        if (self.current_epoch + 1) % self.save_every == 0 and \
                self.current_epoch != self.num_epochs - 1:
            self.checkpoints.append(self.current_epoch)
        self.current_epoch += 1

    def on_train_end(self):
        self.calls.append("train_end")

    def load_checkpoint(self, checkpoint):
        self.current_epoch = checkpoint["epoch"]

    def print_to_log_file(self, *args):
        self.calls.append(" ".join(map(str, args)))


@pytest.fixture()
def budget_trainer(monkeypatch):
    """BudgetTrainer built on the stand-in, with the environment cleared of budgets."""
    names = ("nnunetv2", "nnunetv2.training", "nnunetv2.training.nnUNetTrainer",
             "nnunetv2.training.nnUNetTrainer.nnUNetTrainer")
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules[names[-1]].nnUNetTrainer = StandInTrainer
    for name in (nnunet.ENV_EPOCHS, nnunet.ENV_SECONDS, nnunet.ENV_ITERATIONS):
        monkeypatch.delenv(name, raising=False)
    return nnunet.budget_trainer_class()


def make(trainer_class, folder: Path):
    return trainer_class({"output_folder": str(folder)}, "2d", 0, {})


def test_epoch_budget_keeps_a_checkpoint_after_every_epoch(budget_trainer, monkeypatch,
                                                           tmp_path):
    monkeypatch.setenv(nnunet.ENV_EPOCHS, "3")
    monkeypatch.setenv(nnunet.ENV_ITERATIONS, "2")
    trainer = make(budget_trainer, tmp_path)
    assert (trainer.num_epochs, trainer.num_iterations_per_epoch,
            trainer.num_val_iterations_per_epoch, trainer.save_every) == (3, 2, 1, 1)
    trainer.run_training()
    # Every epoch but the last (which nnU-Net saves as checkpoint_final) leaves a checkpoint.
    assert trainer.checkpoints == [0, 1]
    assert trainer.calls.count("train_step") == 6 and trainer.calls.count("val_step") == 3
    assert trainer.calls[0] == "train_start" and trainer.calls[-1] == "train_end"
    used = json.loads((tmp_path / nnunet.BUDGET_FILE).read_text())
    assert used["epochs"] == 3 and used["seconds"] >= 0


def test_resume_continues_the_budget_it_had_left(budget_trainer, monkeypatch, tmp_path):
    monkeypatch.setenv(nnunet.ENV_EPOCHS, "4")
    (tmp_path / nnunet.BUDGET_FILE).write_text(json.dumps({"seconds": 120.0, "epochs": 2}))
    trainer = make(budget_trainer, tmp_path)
    trainer.load_checkpoint({"epoch": 2})
    assert trainer.elapsed_before == 120.0
    trainer.run_training()
    assert trainer.calls.count("val_step") == 2 * 50  # epochs 2 and 3 only, nnU-Net's 50 each
    used = json.loads((tmp_path / nnunet.BUDGET_FILE).read_text())
    assert used["epochs"] == 4 and used["seconds"] >= 120.0


def test_wall_clock_budget_stops_and_anneals_within_it(budget_trainer, monkeypatch, tmp_path):
    # Each epoch takes 10 "seconds" of a 25-second budget: two epochs fit.
    clock = iter(range(0, 1000, 10))  # one reading per epoch
    monkeypatch.setattr(nnunet.time, "perf_counter", lambda: float(next(clock)))
    monkeypatch.setenv(nnunet.ENV_SECONDS, "25")
    monkeypatch.setenv(nnunet.ENV_ITERATIONS, "1")
    trainer = make(budget_trainer, tmp_path)
    trainer.run_training()
    assert trainer.current_epoch == trainer.num_epochs == trainer.lr_scheduler.max_steps == 2
    assert any("wall-clock budget of 25 s reached after 2 epochs" in call
               for call in trainer.calls)
