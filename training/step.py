"""One optimisation step on one batch: what train.py runs and bench/bench_training.py times.

A step moves the batch to the device, runs the training forward (every output the objective
needs, under float16 autocast on CUDA when AMP is on), computes the objective for the epoch,
and updates the weights through the gradient scaler. The trainer adds everything around it
(learning-rate schedule, logging, validation, checkpoints); the benchmark calls the same object,
so a measured step is the step training takes.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from networks.capabilities import capabilities_of
from networks.objective import TrainingForward, TrainingObjective


class TrainStep:
    """``step(batch, epoch) -> parts``: one update of ``model`` on ``batch``.

    ``batch`` is what :class:`datasets.dataset.SliceDataset` yields, collated: ``image``
    ``[B, S, H, W]`` (absent sequences already zeroed), ``label`` ``[B, H, W]``,
    ``sequence_mask`` ``[B, S]`` and ``labelled`` ``[B]`` (whose labels count; passed on with
    ``pass_labelled``, in semi-supervised runs, where the objective trains the others through
    consistency). The mask reaches the network and the objective only when ``pass_mask``
    (training with sequence dropout) and the network declares it takes one; otherwise an absent
    sequence is only its zeroed channel. ``parts`` are the objective's floats for logging
    (``total`` among them).

    ``forward`` is the module to call for the outputs: by default :class:`TrainingForward` of
    ``model``; under DistributedDataParallel the trainer passes that wrapper wrapped, so that
    gradients of every branch are synchronised.
    """

    def __init__(self, model: nn.Module, objective: TrainingObjective,
                 optimizer: torch.optim.Optimizer, device: torch.device, *, amp: bool = True,
                 pass_mask: bool = False, pass_labelled: bool = False,
                 forward: nn.Module | None = None) -> None:
        self.model = model
        self.objective = objective
        self.optimizer = optimizer
        self.device = device
        self.pass_mask = pass_mask and capabilities_of(model).sequence_mask
        self.pass_labelled = pass_labelled
        self.forward = forward if forward is not None else TrainingForward(model)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")

    def __call__(self, batch: Mapping[str, Tensor], epoch: int) -> dict[str, float]:
        images = batch["image"].to(self.device, non_blocking=True)
        labels = batch["label"].to(self.device, non_blocking=True)
        mask = batch["sequence_mask"].to(self.device) if self.pass_mask else None
        with torch.autocast(self.device.type, dtype=torch.float16,
                            enabled=self.scaler.is_enabled()):
            outputs = self.forward(images, mask)
        labelled = batch["labelled"].to(self.device) if self.pass_labelled else None
        loss, parts = self.objective(outputs, labels, epoch, mask, labelled)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return parts

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
