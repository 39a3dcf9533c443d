"""Training loop for the segmentation networks on the processed layout.

Everything about a run is in one frozen :class:`TrainConfig`; it is written into the run folder
and into every checkpoint, together with the model's own config, so that ``test.py`` rebuilds the
network from a checkpoint file alone.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from datasets.augment import AugmentConfig
from datasets.dataset import SliceDataset
from datasets.labels import NUM_CLASSES
from datasets.processed import ProcessedLayout
from networks.factory import list_models
from networks.objective import ObjectiveConfig, TrainingObjective, forward_outputs
from networks.variants import VARIANTS, create_network, describe, network_record
from prompts.bank import PriorBank, load_prior_bank
from prompts.texts import canonical_names
from utils import atomic_path, resolve_device, seed_everything, write_json

log = logging.getLogger(__name__)

#: Datasets the entry points know by name: processed root used when ``--root_path`` is not given.
DATASETS: dict[str, dict[str, Any]] = {
    "Myops": {"root_path": "data/phantom/Processed_data", "num_classes": NUM_CLASSES},
}
#: Where the immseg model looks for its prior bank unless told (``python -m prompts.encode``).
DEFAULT_PRIORS_PATH = "priors/biomedclip.pt"
CHECKPOINT_LAST = "checkpoint_last.pth"
CHECKPOINT_FINAL = "checkpoint_final.pth"


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Defaults follow the released I_MMSeg recipe (AdamW, poly decay)."""

    dataset: str = "Myops"
    model: str = "immseg"
    vit_name: str = "R50-ViT-B_16"
    priors_path: str | None = None
    sequence: str = "LGE"  # the input of the single-sequence variant
    share_encoder: bool = False
    root_path: str = "data/phantom/Processed_data"
    list_dir: str | None = None
    output_dir: str = "runs/Myops_immseg_R50-ViT-B_16"
    img_size: int = 128
    num_classes: int = NUM_CLASSES
    batch_size: int = 24
    base_lr: float = 1e-3
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    max_epochs: int = 300
    seed: int = 1234
    num_workers: int = 2
    pretrained_path: str | None = None
    ce_weight: float = 0.2
    dice_weight: float = 0.8
    aux_weight: float = 0.4
    contrastive_weight: float = 0.1
    contrastive_start_epoch: int = 20
    temperature: float = 0.07
    class_weights: tuple[float, ...] | None = None  # cross-entropy weights per class
    augment: bool = True
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; known: {sorted(DATASETS)}")
        if self.model not in VARIANTS:
            raise ValueError(f"unknown model {self.model!r}; known: {sorted(VARIANTS)}")
        if self.vit_name not in list_models():
            raise ValueError(f"unknown vit_name {self.vit_name!r}; known: {list_models()}")
        if self.model == "immseg" and self.priors_path is None:
            object.__setattr__(self, "priors_path", DEFAULT_PRIORS_PATH)
        if self.model != "immseg" and self.priors_path is not None:
            raise ValueError(f"the {self.model} model uses no text priors; drop priors_path "
                             f"({self.priors_path})")
        if self.class_weights is not None:
            object.__setattr__(self, "class_weights", tuple(self.class_weights))
            if len(self.class_weights) != self.num_classes:
                raise ValueError(f"class_weights has {len(self.class_weights)} entries for "
                                 f"{self.num_classes} classes")
        self.objective()  # validates the loss settings
        if self.img_size < 16 or self.img_size % 16:
            raise ValueError(f"img_size must be a positive multiple of 16, got {self.img_size}")
        for name in ("batch_size", "max_epochs", "num_classes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.base_lr > 0 or self.weight_decay < 0 or self.poly_power < 0:
            raise ValueError("base_lr must be > 0, weight_decay and poly_power >= 0")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")

    def objective(self) -> ObjectiveConfig:
        return ObjectiveConfig(
            ce_weight=self.ce_weight, dice_weight=self.dice_weight, aux_weight=self.aux_weight,
            contrastive_weight=self.contrastive_weight,
            contrastive_start_epoch=self.contrastive_start_epoch, temperature=self.temperature,
            class_weights=self.class_weights)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def poly_lr(base_lr: float, iteration: int, max_iterations: int, power: float) -> float:
    """Polynomial decay from ``base_lr`` to 0 over ``max_iterations`` (per iteration)."""
    return base_lr * (1.0 - min(iteration, max_iterations) / max_iterations) ** power


def save_checkpoint(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    config: TrainConfig, epoch: int, iteration: int,
                    priors: PriorBank | None = None) -> None:
    """Write a self-describing checkpoint atomically (the network rebuilds from it alone)."""
    payload = {
        "network": network_record(model),
        "priors": None if priors is None else {"model_id": priors.model_id,
                                               "text_hash": priors.text_hash,
                                               "path": config.priors_path},
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "iteration": iteration,
        "train_config": config.to_dict(),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    checkpoint: Path
    epochs: int
    iterations: int
    final_loss: float
    seconds: float


def train(config: TrainConfig) -> TrainResult:
    """Train ``config.vit_name`` on the processed training slices and save checkpoints."""
    start_time = time.perf_counter()
    seed_everything(config.seed)
    device = resolve_device(config.device)
    run_dir = Path(config.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", config.to_dict())

    layout = ProcessedLayout(Path(config.root_path),
                             list_dir=Path(config.list_dir) if config.list_dir else None)
    names = layout.names("train")
    dataset = SliceDataset(layout, names, config.img_size,
                           AugmentConfig() if config.augment else None, seed=config.seed)
    loader_generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True,
                        num_workers=config.num_workers, generator=loader_generator,
                        pin_memory=device.type == "cuda", drop_last=False,
                        # Workers that outlive an epoch keep prefetching across its boundary.
                        persistent_workers=config.num_workers > 0)

    priors = (load_prior_bank(config.priors_path, required=canonical_names())
              if config.priors_path is not None else None)
    if priors is not None:
        log.info("priors: %s (%s, texts %s...)", config.priors_path, priors.model_id,
                 priors.text_hash[:12])
    model = create_network(config.model, backbone=config.vit_name, img_size=config.img_size,
                           num_classes=config.num_classes, sequence=config.sequence,
                           priors=priors, share_encoder=config.share_encoder,
                           pretrained=config.pretrained_path)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.base_lr,
                                  weight_decay=config.weight_decay)
    objective = TrainingObjective(config.num_classes, config.objective()).to(device)
    max_iterations = config.max_epochs * len(loader)
    log.info("training %s on %d slices (%d iterations, device %s) -> %s", describe(model),
             len(dataset), max_iterations, device, run_dir)

    iteration, loss_value = 0, math.nan
    with SummaryWriter(str(run_dir / "tensorboard")) as writer:
        for epoch in range(config.max_epochs):
            model.train()
            dataset.set_epoch(epoch)
            epoch_losses = []
            progress = tqdm(loader, desc=f"epoch {epoch + 1}/{config.max_epochs}", unit="batch",
                            leave=False)
            for batch in progress:
                lr = poly_lr(config.base_lr, iteration, max_iterations, config.poly_power)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                images = batch["image"].to(device, non_blocking=True)
                labels = batch["label"].to(device, non_blocking=True)
                loss, parts = objective(forward_outputs(model, images), labels, epoch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                iteration += 1
                loss_value = float(loss.detach())
                epoch_losses.append(loss_value)
                progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
                writer.add_scalar("train/lr", lr, iteration)
                writer.add_scalar("train/loss", loss_value, iteration)
                for name, value in parts.items():
                    writer.add_scalar(f"train/{name}", float(value), iteration)
            log.info("epoch %d/%d: mean loss %.4f, lr %.2e", epoch + 1, config.max_epochs,
                     float(np.mean(epoch_losses)), lr)
            save_checkpoint(run_dir / CHECKPOINT_LAST, model=model, optimizer=optimizer,
                            config=config, epoch=epoch + 1, iteration=iteration, priors=priors)
    final = run_dir / CHECKPOINT_FINAL
    save_checkpoint(final, model=model, optimizer=optimizer, config=config,
                    epoch=config.max_epochs, iteration=iteration, priors=priors)
    seconds = time.perf_counter() - start_time
    log.info("finished in %.1f s; final checkpoint %s", seconds, final)
    return TrainResult(run_dir, final, config.max_epochs, iteration, loss_value, seconds)
