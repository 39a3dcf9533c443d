"""TrainStep: the one optimisation step of train.py and bench_training."""

from __future__ import annotations

import argparse

import torch

from bench.bench_training import bench_model
from datasets.labels import MODALITIES, NUM_CLASSES
from networks.objective import ObjectiveConfig, TrainingObjective
from networks.variants import create_network
from training.step import TrainStep

CPU = torch.device("cpu")


def _batch(seed: int = 0, size: int = 32) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, NUM_CLASSES, (4, 4, 4), generator=generator)
    label = coarse.repeat_interleave(size // 4, dim=1).repeat_interleave(size // 4, dim=2)
    # Images that carry the label, so that a few steps can fit it.
    image = torch.stack([label.float() / NUM_CLASSES] * len(MODALITIES), dim=1)
    mask = torch.tensor([[True, True, True], [True, False, True], [False, True, True],
                         [True, True, False]])
    return {"image": image * mask[:, :, None, None], "label": label, "sequence_mask": mask}


def _step(variant: str, pass_mask: bool) -> TrainStep:
    torch.manual_seed(0)
    model = create_network(variant, backbone="tiny", img_size=32, dropout_rate=0.0)
    return TrainStep(model, TrainingObjective(NUM_CLASSES, ObjectiveConfig()),
                     torch.optim.AdamW(model.parameters(), lr=1e-2), CPU, pass_mask=pass_mask)


def test_steps_lower_the_loss_of_a_batch():
    step, batch = _step("transunet", pass_mask=False), _batch()
    losses = [step(batch, epoch=0)["total"] for _ in range(8)]
    assert losses[-1] < 0.8 * losses[0]
    step.set_lr(0.5)
    assert all(group["lr"] == 0.5 for group in step.optimizer.param_groups)


def test_the_mask_reaches_only_networks_that_declare_it():
    seen = []
    masked = _step("immseg_noprior", pass_mask=True)
    plain = _step("transunet", pass_mask=True)
    for step in (masked, plain):
        forward = step.forward.forward
        step.forward.forward = lambda images, mask, f=forward: seen.append(mask) or f(images, mask)
        parts = step(_batch(), epoch=0)
        assert {"total", "seg"} <= set(parts)
    assert torch.equal(seen[0], _batch()["sequence_mask"]) and seen[1] is None
    assert not _step("immseg_noprior", pass_mask=False).pass_mask


def test_the_benchmark_times_the_training_step():
    args = argparse.Namespace(model="transunet", vit_name="tiny", img_size=32, batch_size=2,
                              sequence_dropout=0.5, warmup=1, steps=2, amp=True)
    result = bench_model(args, CPU)
    assert result["steps_timed"] == 2 and result["s_per_step"] > 0
