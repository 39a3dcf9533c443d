"""Semi-supervised training: which cases keep their labels, labels that never leave the dataset,
supervised terms on labelled samples only, and cross-sequence consistency with real gradients."""

from __future__ import annotations

import math

import pytest
import torch

import commands.train as train_script
from datasets.dataset import SliceDataset
from datasets.processed import ProcessedLayout, case_of
from networks.immseg import IMMSegOutput
from networks.objective import ObjectiveConfig, TrainingObjective, channel_affinity
from prompts.bank import save_prior_bank
from tests.helpers import random_bank, write_ring_dataset
from trainer import TrainConfig, unlabelled_cases

NAMES = [f"Case{3000 + c:04d}_slice{k:03d}" for c in range(24) for k in range(3)]


def test_labelled_cases_are_a_seeded_share_of_the_cases():
    unlabelled = unlabelled_cases(NAMES, 0.25, seed=1)
    assert len(unlabelled) == 18  # 6 of 24 cases keep their labels
    assert unlabelled == unlabelled_cases(list(reversed(NAMES)), 0.25, seed=1)
    assert unlabelled != unlabelled_cases(NAMES, 0.25, seed=2)
    assert unlabelled_cases(NAMES, 1.0, seed=1) == frozenset()
    assert len(unlabelled_cases(NAMES, 0.01, seed=1)) == 23  # never fewer than one labelled
    with pytest.raises(ValueError, match="labelled_fraction"):
        TrainConfig(model="immseg", labelled_fraction=0.0)
    with pytest.raises(ValueError, match="per-sequence branches"):
        TrainConfig(model="transunet", labelled_fraction=0.5)
    with pytest.raises(ValueError, match="batch_size must be >= 2"):
        TrainConfig(model="immseg", labelled_fraction=0.5, batch_size=1)
    with pytest.raises(ValueError, match="labelled_per_batch"):
        TrainConfig(model="immseg", labelled_fraction=0.5, batch_size=4, labelled_per_batch=4)
    with pytest.raises(ValueError, match="labelled_per_batch"):
        TrainConfig(model="immseg", batch_size=4, labelled_per_batch=2)  # nothing unlabelled


def test_unlabelled_slices_carry_no_label(tmp_path):
    root = write_ring_dataset(tmp_path, train_cases=3, slices_per_case=2)
    layout = ProcessedLayout(root)
    names = layout.names("train")
    dataset = SliceDataset(layout, names, 32, None, unlabelled=frozenset({"case0002"}))
    for index, name in enumerate(names):
        item = dataset[index]
        if case_of(name) == "case0002":
            assert not item["labelled"] and int(item["label"].max()) == 0
        else:
            assert item["labelled"] and int(item["label"].max()) > 0


def test_supervised_terms_count_only_labelled_samples():
    torch.manual_seed(0)
    objective = TrainingObjective(4, ObjectiveConfig(consistency_weight=0.0), num_sequences=3)
    aux = [torch.randn(2, 4, 4, 4) for _ in range(3)]
    logits = torch.randn(2, 4, 4, 4)
    labels = torch.randint(0, 4, (2, 4, 4))
    outputs = IMMSegOutput(logits, tuple(aux), (), torch.zeros(2, 4, 8))
    labelled = torch.tensor([True, False])
    loss, _ = objective(outputs, labels, epoch=0, labelled=labelled)
    # The same as the labelled sample alone...
    alone = IMMSegOutput(logits[:1], tuple(a[:1] for a in aux), (), torch.zeros(1, 4, 8))
    expected, _ = objective(alone, labels[:1], epoch=0)
    torch.testing.assert_close(loss, expected)
    # ...whatever the unlabelled sample's label says.
    other = labels.clone()
    other[1] = (other[1] + 1) % 4
    changed, _ = objective(outputs, other, epoch=0, labelled=labelled)
    torch.testing.assert_close(changed, loss)


def test_consistency_values_and_gradients():
    objective = TrainingObjective(4, ObjectiveConfig(consistency_weight=1.0,
                                                     consistency_rampup=0.0), num_sequences=2)
    # One unlabelled sample, one pixel: branch 0 is sure of class 0, branch 1 uniform.
    a = torch.tensor([10.0, 0.0, 0.0, 0.0]).view(1, 4, 1, 1).requires_grad_(True)
    b = torch.zeros(1, 4, 1, 1, requires_grad=True)
    f0 = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 2).requires_grad_(True)
    f1 = torch.tensor([[1.0, 1.0], [1.0, 1.0]]).view(1, 2, 1, 2)
    outputs = IMMSegOutput(torch.zeros(1, 4, 1, 1), (a, b), (), torch.zeros(1, 4, 8),
                           sequence_features=(f0, f1))
    rows = torch.tensor([[True], [True]])
    p = torch.softmax(a.detach().flatten(), 0)
    agreement = float(((p - 0.25) ** 2).sum())
    # Affinities: f0's channels are orthogonal unit vectors (identity), f1's equal (all ones).
    torch.testing.assert_close(channel_affinity(f0.detach())[0], torch.eye(2))
    semantic = float(((torch.eye(2) - torch.ones(2, 2)) ** 2).mean())
    value = objective._consistency(outputs, rows)
    assert float(value.detach()) == pytest.approx((agreement + semantic) / 2, rel=1e-5)
    value.backward()
    assert a.grad is not None and b.grad is not None and f0.grad is not None
    assert float(b.grad.abs().sum()) > 0  # both branches learn, not only one
    # Labelled samples take no part; the ramp starts near zero.
    assert float(objective._consistency(outputs, torch.tensor([[False], [True]])).detach()) == 0.0
    ramped = TrainingObjective(4, ObjectiveConfig(consistency_weight=1.0, max_epochs=10,
                                                  consistency_rampup=0.5), num_sequences=2)
    assert ramped.consistency_ramp(0) == pytest.approx(math.exp(-5))
    assert ramped.consistency_ramp(5) == 1.0


def test_a_semi_supervised_run_trains(tmp_path):
    root = write_ring_dataset(tmp_path / "data", train_cases=4, slices_per_case=2)
    bank = save_prior_bank(random_bank(), tmp_path / "bank.pt")
    run = tmp_path / "run"
    assert train_script.main([
        "--dataset", "Myops", "--model", "immseg", "--vit_name", "tiny", "--root_path",
        str(root), "--img_size", "32", "--batch_size", "4", "--num_workers", "0",
        "--val_every", "0", "--val_fraction", "0", "--device", "cpu", "--priors_path",
        str(bank), "--output_dir", str(run), "--max_epochs", "2", "--labelled_fraction", "0.5",
        "--consistency_rampup", "0"]) == 0
    log = (run / "log.txt").read_text()
    assert "2 of 4 training cases labelled" in log and "on 8 slices" in log
    # Without consistency the unlabelled cases would train nothing: the labelled ones alone.
    alone = tmp_path / "alone"
    assert train_script.main([
        "--dataset", "Myops", "--model", "immseg", "--vit_name", "tiny", "--root_path",
        str(root), "--img_size", "32", "--batch_size", "4", "--num_workers", "0",
        "--val_every", "0", "--val_fraction", "0", "--device", "cpu", "--priors_path",
        str(bank), "--output_dir", str(alone), "--max_epochs", "1", "--labelled_fraction",
        "0.5", "--consistency_weight", "0"]) == 0
    assert "on 4 slices" in (alone / "log.txt").read_text()
    # Both take one pass over all 8 training slices per epoch: 2 steps of batch 4, the
    # semi-supervised run's batches half labelled, the labelled-only run's wholly.
    semi = torch.load(run / "checkpoint_final.pth", weights_only=False)
    baseline = torch.load(alone / "checkpoint_final.pth", weights_only=False)
    assert semi["iteration"] == 4 and baseline["iteration"] == 2
