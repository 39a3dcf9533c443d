"""Balancing the sequences' branches: self-distillation and progress weights, against
hand-computed values, and their state across a resumed run."""

from __future__ import annotations

import math

import pytest
import torch

import commands.train as train_script
from networks.checkpoint import CHECKPOINT_LAST
from networks.objective import ObjectiveConfig, TrainingObjective
from prompts.bank import save_prior_bank
from tests.helpers import random_bank, write_ring_dataset


def _objective(**changes) -> TrainingObjective:
    return TrainingObjective(4, ObjectiveConfig(**changes), num_sequences=3)


def test_distillation_is_the_tempered_kl_to_the_fused_prediction():
    objective = _objective(distill_weight=1.0, distill_temperature=2.0)
    main = torch.tensor([2.0, 0.0, 0.0, 0.0]).view(1, 4, 1, 1)
    aux = [torch.tensor([0.0, 2.0, 0.0, 0.0]).view(1, 4, 1, 1), main.clone(), main.clone()]
    present = torch.tensor([[True], [True], [False]])
    p = torch.softmax(main.flatten() / 2, 0)
    q = torch.softmax(aux[0].flatten() / 2, 0)
    kl = float((p * (p.log() - q.log())).sum()) * 4  # T^2
    # Sequence 0 differs, sequence 1 equals the fused prediction, sequence 2 is absent.
    value = objective._distillation(main, aux, present)
    assert float(value) == pytest.approx(kl / 2, rel=1e-5)
    # The fused side is detached: only the branches receive gradient.
    main.requires_grad_(True)
    aux[0].requires_grad_(True)
    objective._distillation(main, aux, present).backward()
    assert main.grad is None and aux[0].grad is not None


def test_progress_weights_favour_the_branch_that_learned_least():
    objective = _objective(balance=True)
    everyone = torch.tensor([True, True, True])
    first = objective._balanced(torch.tensor([1.0, 2.0, 4.0]), everyone)
    assert float(first) == pytest.approx((1 + 2 + 4) / 3)  # nothing tracked yet: weights 1
    # Sequence 0 halves its loss, the others stay: its progress ratio drops to 0.95.
    second = objective._balanced(torch.tensor([0.5, 2.0, 4.0]), everyone)
    ratio = torch.tensor([0.9 + 0.1 * 0.5, 1.0, 1.0])
    weights = 3 * ratio / ratio.sum()
    torch.testing.assert_close(objective.branch_weights(everyone), weights)
    expected = (weights * torch.tensor([0.5, 2.0, 4.0])).sum() / 3
    assert float(second) == pytest.approx(float(expected))
    assert float(weights[0]) < 1 < float(weights[1])
    # An absent sequence weighs nothing and leaves its tracked values alone.
    before = objective.ema_aux.clone()
    partial = torch.tensor([True, False, True])
    objective._balanced(torch.tensor([0.5, 9.0, 4.0]), partial)
    assert objective.ema_aux[1] == before[1]
    assert float(objective.branch_weights(partial)[1]) == 0.0
    assert float(objective.branch_weights(partial).sum()) == pytest.approx(2.0)
    # The state travels through state_dict (resumable checkpoints).
    copy = _objective(balance=True)
    copy.load_state_dict(objective.state_dict())
    torch.testing.assert_close(copy.branch_weights(everyone), objective.branch_weights(everyone))
    assert math.isnan(float(_objective().first_aux[0]))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="distill_weight"):
        ObjectiveConfig(distill_weight=-1.0)
    with pytest.raises(ValueError, match="distill_temperature"):
        ObjectiveConfig(distill_temperature=0.0)


def test_a_resumed_run_keeps_the_tracked_progress(tmp_path):
    root = write_ring_dataset(tmp_path / "data", train_cases=3, slices_per_case=2)
    bank = save_prior_bank(random_bank(), tmp_path / "bank.pt")
    run = tmp_path / "run"

    def train(epochs: int, *extra: str) -> int:
        return train_script.main([
            "--dataset", "Myops", "--model", "immseg", "--vit_name", "tiny", "--root_path",
            str(root), "--img_size", "32", "--batch_size", "2", "--num_workers", "0",
            "--val_every", "0", "--val_fraction", "0", "--device", "cpu", "--priors_path",
            str(bank), "--output_dir", str(run), "--balance_sequences", "--distill_weight",
            "0.5", "--sequence_dropout", "0.5", "--max_epochs", str(epochs), *extra])

    assert train(1) == 0
    first = torch.load(run / CHECKPOINT_LAST, weights_only=False)["objective"]
    assert torch.isfinite(first["first_aux"]).all()
    assert train(2, "--resume") == 0
    resumed = torch.load(run / CHECKPOINT_LAST, weights_only=False)["objective"]
    # The first losses are kept from the first run (a fresh objective would re-take them);
    # the running means moved on.
    torch.testing.assert_close(resumed["first_aux"], first["first_aux"])
    assert not torch.equal(resumed["ema_aux"], first["ema_aux"])
