"""Training loop for the segmentation networks on the processed layout.

Everything about a run is in one frozen :class:`TrainConfig`; it is written into the run folder
and into every checkpoint, together with the model's own config, so that ``test.py`` rebuilds the
network from a checkpoint file alone.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from datasets.augment import AugmentConfig
from datasets.dataset import EpochIndices, SliceDataset
from datasets.folds import check_fold, fold_list_dir
from datasets.labels import MODALITIES, NUM_CLASSES
from datasets.missing import DATASET_MISSING_FILE, MissingSequences
from datasets.processed import DEFAULT_PROCESSED_ROOT, ProcessedLayout, case_of
from datasets.sequence_jitter import JITTER_MISALIGNMENT, JitterConfig
from datasets.two_stream import TwoStreamSampler, steps_per_pass
from networks.backbones import list_backbones
from networks.capabilities import capabilities_of
from networks.checkpoint import (
    CHECKPOINT_BEST,
    CHECKPOINT_FINAL,
    CHECKPOINT_LAST,
    load_training_checkpoint,
    restore_rng_state,
    save_training_checkpoint,
)
from networks.immseg import CONTRASTIVE, IMMSegConfig
from networks.inference import predict_volume
from networks.objective import SCHEDULES, ObjectiveConfig, TrainingObjective
from networks.prior_attention import CROSS_ATTENTION, PixelPairAttention
from networks.variants import (
    VARIANTS,
    check_options,
    create_network,
    describe,
    option_names,
)
from prompts.bank import load_prior_bank
from prompts.texts import canonical_names
from training.distributed import (
    DistContext,
    broadcast_flag,
    convert_batchnorm,
    distributed_session,
)
from training.overlays import overlay_grid
from training.step import TrainStep
from training.validation import (
    BestModelTracker,
    split_validation_cases,
    validate,
    validation_volumes,
)
from utils import (
    ConfigRecord,
    field_default,
    non_finite_tensors,
    remove_stale_temporaries,
    require_finite_fields,
    resolve_device,
    seed_everything,
    setting,
    write_json,
)

log = logging.getLogger(__name__)

#: Datasets the entry points know by name: processed root used when ``--root_path`` is not given.
DATASETS: dict[str, dict[str, Any]] = {
    "Myops": {"root_path": DEFAULT_PROCESSED_ROOT, "num_classes": NUM_CLASSES},
}
#: Where the immseg model looks for its prior bank unless told (``python -m prompts.encode``).
DEFAULT_PRIORS_PATH = "priors/biomedclip.pt"
OPTIMIZERS = ("adamw", "sgd")
_LOSS = ObjectiveConfig()
#: The best model is the one with the highest mean Dice over these groups.
PATHOLOGY_GROUPS = ("scar", "edema alone")


#: What a saved config that lacks a field meant by it, where that differs from the field's
#: default today: sequence_jitter's default became the variant's (0.5 for immseg) in a later
#: version than the field, and runs from before it had none.
LEGACY_DEFAULTS: dict[str, Any] = {"sequence_jitter": 0.0}
#: jitter_strength stays below this: the scale change of the jitter's model stays under 50 %.
_MAX_JITTER_STRENGTH = 0.5 / JITTER_MISALIGNMENT.max_scale


def default_sequence_jitter(model: str) -> float:
    """``model``'s training jitter when none is given (networks.variants: 0.5 for immseg and
    immseg_noprior, else 0)."""
    return VARIANTS[model].train_defaults.get("sequence_jitter", 0.0)


@dataclass(frozen=True)
class TrainConfig(ConfigRecord):
    """One training run. Defaults follow the released I_MMSeg recipe (AdamW, poly decay).

    Every field is declared once, here: its default, and in its metadata the help and choices
    of the train.py flag made from it (:mod:`commands.config_flags`). A run's ``config.json``
    is this dataclass's :meth:`to_dict`, and ``train.py --config`` takes it back.
    """

    dataset: str = setting("Myops", "dataset (its default processed root and classes)",
                           choices=lambda: sorted(DATASETS))
    model: str = setting("immseg", "network variant: " + "; ".join(
        f"{name}: {spec.description}" for name, spec in VARIANTS.items()),
        choices=lambda: sorted(VARIANTS))
    vit_name: str = setting("R50-ViT-B_16", "encoder backbone of every variant",
                            choices=list_backbones)
    priors_path: str | None = setting(
        None, "prior bank (.pt) from `python -m prompts.encode`; text-prior variants only",
        shown=f"{DEFAULT_PRIORS_PATH} for immseg")
    sequence: str = setting("LGE", "input of the transunet_single variant", choices=MODALITIES)
    # immseg's build options (networks.variants.option_names), with IMMSegConfig's defaults.
    share_encoder: bool = setting(IMMSegConfig.share_encoder,
                                  "immseg variants: one encoder for all sequences")
    cross_attention: str = setting(
        IMMSegConfig.cross_attention,
        "immseg variants: how sequences exchange information at the bottleneck: "
        "sequence (ours: attention over the 3 sequences at each pixel) or pixel (the release's: "
        "every pixel against every pixel of the other sequences)", choices=CROSS_ATTENTION)
    pixel_values: str = setting(
        IMMSegConfig.pixel_values,
        "with --cross_attention pixel: aggregate the sequence's own features (as "
        "released) or the partner's", choices=PixelPairAttention.VALUES)
    contrastive: str = setting(
        IMMSegConfig.contrastive,
        "immseg variants: the contrastive term's form: pixel_text (ours: every H/4 "
        "pixel against the class texts, area-reduced labels) or release (the released code's "
        "supervised contrast of sampled pixels of each sequence's raw skips at H/2, H/4, H/8 "
        "with the class texts; bSSFP leaves out scar and edema, LGE and T2w background)",
        choices=CONTRASTIVE)
    anchor_skips: int = setting(
        IMMSegConfig.anchor_skips,
        "immseg variants (ours, for misaligned inputs): the finest N skip resolutions (1: H/2, "
        "2: also H/4, 3: also H/8) reach the decoder from LGE alone; 0: every sequence")
    root_path: str = setting(DATASETS["Myops"]["root_path"],
                             "processed data root, written by preprocess_data.py")
    list_dir: str | None = setting(None, "lists folder", shown="<root_path>/lists, or the "
                                   "fold's lists under cross-validation")
    folds: int = setting(0, "K-fold cross-validation over the lists preprocess_data.py wrote "
                         "(lists/cv<K>/); runs go to <output_dir>/fold<k>; 0: the release split")
    fold: int | None = setting(None, "the fold to train", shown="with --folds: every fold, one "
                               "after the other; with --resume finished folds are skipped")
    output_dir: str = setting("runs/Myops_immseg_R50-ViT-B_16", "run folder",
                              shown="runs/<dataset>_<model>_<vit_name>[_cv<K>]")
    img_size: int = setting(128, "network input side (px), a multiple of 16")
    num_classes: int = setting(NUM_CLASSES, cli=False)  # the dataset's
    batch_size: int = setting(24, "global batch (split over torchrun's processes)")
    optimizer: str = setting("adamw", "adamw (the released recipe) or sgd (momentum 0.9)",
                             choices=OPTIMIZERS)
    base_lr: float = setting(1e-3, "learning rate before poly decay")
    weight_decay: float = setting(1e-4, "weight decay")
    poly_power: float = setting(0.9, "exponent of the poly decay to 0 over the run")
    max_epochs: int = setting(300, "epochs")
    seed: int = setting(1234, "seed of every random draw (augmentation, dropout, shuffle)")
    num_workers: int = setting(2, "data loader processes")
    pretrained_path: str | None = setting(
        None, "Google R50+ViT-B_16.npz (local file) to initialise every encoder",
        shown="model/vit_checkpoint/imagenet21k/<vit_name>.npz when that file exists (where "
              "the release's README puts it), else none")
    # Loss settings: the objective's own defaults (the release's weights; its two-stage schedule
    # is the loss_schedule option), declared in networks.objective.ObjectiveConfig.
    ce_weight: float = setting(_LOSS.ce_weight, "cross-entropy weight of the main output")
    dice_weight: float = setting(_LOSS.dice_weight, "Dice weight of the main output")
    aux_weight: float = setting(_LOSS.aux_weight,
                                "per-sequence deep supervision (immseg variants)")
    contrastive_weight: float = setting(_LOSS.contrastive_weight,
                                        "pixel-text contrastive term (immseg variants)")
    contrastive_start_epoch: int = setting(
        _LOSS.contrastive_start_epoch, "0-based epoch from which the contrastive term counts")
    temperature: float = setting(_LOSS.temperature, "temperature of the contrastive term")
    loss_schedule: str = setting(
        _LOSS.schedule, "constant (ours): one stage; release_staged: the released code's first "
        "third of the epochs on the per-sequence branches alone, then all terms (weights 1, "
        "0.5 x sum, 0.05), scaled to max_epochs", choices=SCHEDULES)
    distill_weight: float = setting(
        _LOSS.distill_weight, "self-distillation from the fused prediction to each present "
        "sequence's branch (immseg variants; for missing sequences, in the spirit of PASSION)")
    distill_temperature: float = setting(_LOSS.distill_temperature,
                                         "temperature of the self-distillation")
    balance: bool = setting(_LOSS.balance, "weight each sequence's branch by its relative "
                            "progress: the branch whose loss fell least weighs most",
                            flag="balance_sequences")
    labelled_fraction: float = setting(
        1.0, "semi-supervised: share of the training cases whose labels are used (drawn with "
        "the seed); the others train through cross-sequence consistency (immseg variants)")
    labelled_per_batch: int | None = setting(
        None, "semi-supervised: labelled slices in each global batch, the rest unlabelled; "
        "every epoch takes the steps of one pass over all training slices, also when the "
        "labelled cases train alone (datasets.two_stream)", shown="half the batch")
    consistency_weight: float = setting(_LOSS.consistency_weight,
                                        "weight of the consistency on unlabelled cases")
    consistency_rampup: float = setting(_LOSS.consistency_rampup,
                                        "share of the epochs over which that weight ramps up")
    class_weights: tuple[float, ...] | None = setting(
        None, "cross-entropy weight per class (background, myocardium, scar, edema)")
    vit_dropout: float | None = setting(None, "transformer dropout",
                                        shown="the backbone's, 0.1")
    val_every: int = setting(5, "validate every N epochs (0: no validation)")
    val_fraction: float = setting(0.2, "share of the training cases held out for validation")
    patience: int | None = setting(None, "stop after this many validations without a better "
                                   "model")
    amp: bool = setting(True, "no float16 autocast on CUDA (never used on the CPU)")
    augment: bool = setting(True, "no augmentation")
    sequence_dropout: float = setting(
        0.0, "probability that a training slice loses 1 or 2 of its 3 sequences (zeroed; immseg "
        "variants also get the presence mask), so the model learns to segment with missing "
        "sequences; not for transunet_single")
    sequence_jitter: float | None = setting(
        None, "probability that bSSFP and T2w, each on its own, are moved off LGE and the label "
        "by a random misalignment (datasets.sequence_jitter: rotation up to 8 deg, shift 5 mm, "
        "scale 5 %, a 1.5 mm smooth field): training for sequences registration leaves "
        "misaligned", shown="0.5 for immseg and immseg_noprior (docs/misalignment.md), else 0")
    jitter_strength: float = setting(
        1.0, "every magnitude of that misalignment times this (0.5: up to 4 deg, 2.5 mm, "
        "2.5 %, 0.75 mm)")
    missing_file: str | None = setting(
        None, "JSON naming the sequences each training case lacks (datasets.missing; e.g. drawn "
        "at PASSION-style imbalanced rates): those channels are zeroed and masked in every epoch")
    device: str = setting("auto", "auto, cpu, cuda, cuda:1, ...")

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; known: {sorted(DATASETS)}")
        if self.model not in VARIANTS:
            raise ValueError(f"unknown model {self.model!r}; known: {sorted(VARIANTS)}")
        spec = VARIANTS[self.model]
        if self.vit_name not in list_backbones():
            raise ValueError(f"unknown vit_name {self.vit_name!r}; known: {list_backbones()}")
        if spec.text_priors and self.priors_path is None:
            object.__setattr__(self, "priors_path", DEFAULT_PRIORS_PATH)
        if not spec.text_priors and self.priors_path is not None:
            raise ValueError(f"the {self.model} model uses no text priors; drop priors_path "
                             f"({self.priors_path})")
        if self.folds:
            check_fold(self.folds, self.fold)
            if self.list_dir is None:
                object.__setattr__(self, "list_dir", str(fold_list_dir(
                    Path(self.root_path) / "lists", self.folds, self.fold)))
        elif self.fold is not None:
            raise ValueError(f"fold {self.fold} given without folds")
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
        require_finite_fields(self, "base_lr", positive=True)
        require_finite_fields(self, "weight_decay", "poly_power")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.val_every < 0 or not 0 <= self.val_fraction < 1:
            raise ValueError(f"need val_every >= 0 and 0 <= val_fraction < 1, got "
                             f"{self.val_every}, {self.val_fraction}")
        if (self.val_every > 0) != (self.val_fraction > 0):
            raise ValueError("validation needs both val_every > 0 and val_fraction > 0 (set "
                             "both to 0 to train without validation)")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 or None, got {self.patience}")
        if self.vit_dropout is not None and not 0 <= self.vit_dropout < 1:
            raise ValueError(f"vit_dropout must lie in [0, 1), got {self.vit_dropout}")
        if isinstance(self.sequence_dropout, bool) or not 0 <= self.sequence_dropout < 1:
            raise ValueError(f"sequence_dropout must lie in [0, 1), got "
                             f"{self.sequence_dropout!r}")
        check_options(self.model, self.network_options())
        if self.sequence_jitter is None:
            object.__setattr__(self, "sequence_jitter", default_sequence_jitter(self.model))
        if isinstance(self.sequence_jitter, bool) or not 0 <= self.sequence_jitter <= 1:
            raise ValueError(f"sequence_jitter must lie in [0, 1], got {self.sequence_jitter!r}")
        if (isinstance(self.jitter_strength, bool)
                or not 0 < self.jitter_strength < _MAX_JITTER_STRENGTH):
            raise ValueError(f"jitter_strength must lie in (0, {_MAX_JITTER_STRENGTH:g}) (a scale "
                             f"change under 50 %), got {self.jitter_strength!r}")
        if self.jitter_strength != 1 and self.sequence_jitter == 0:
            raise ValueError(f"jitter_strength {self.jitter_strength} has no effect without "
                             f"sequence_jitter > 0 (0 for {self.model} here)")
        if self.sequence_jitter > 0 and spec.capabilities.single_sequence:
            raise ValueError("transunet_single reads one sequence: sequence_jitter would move "
                             "bSSFP or T2w off its label, or LGE's partners it never reads")
        if isinstance(self.labelled_fraction, bool) or not 0 < self.labelled_fraction <= 1:
            raise ValueError(f"labelled_fraction must lie in (0, 1], got "
                             f"{self.labelled_fraction!r}")
        if self.labelled_per_batch is not None and (
                isinstance(self.labelled_per_batch, bool)
                or not 1 <= self.labelled_per_batch < self.batch_size
                or self.labelled_fraction >= 1):
            raise ValueError(f"labelled_per_batch needs labelled_fraction < 1 and must lie in "
                             f"[1, batch_size - 1], got {self.labelled_per_batch!r}")
        if self.labelled_fraction < 1 and self.batch_size < 2:
            raise ValueError("a semi-supervised batch holds labelled and unlabelled slices: "
                             f"batch_size must be >= 2, got {self.batch_size}")
        if self.labelled_fraction < 1 and not spec.capabilities.training_outputs:
            raise ValueError(f"{self.model} has no per-sequence branches to train unlabelled "
                             "cases with; semi-supervised training needs an immseg variant")
        if (self.distill_weight > 0 or self.balance) and \
                not spec.capabilities.training_outputs:
            raise ValueError(f"{self.model} has no per-sequence branches: distill_weight and "
                             "balance_sequences apply to the immseg variants")
        if (self.sequence_dropout > 0 or self.missing_file) and \
                spec.capabilities.single_sequence:
            raise ValueError("transunet_single reads one sequence: sequence_dropout or a "
                             "missing_file would only blank its input; use a multi-sequence "
                             "variant")

    def network_options(self) -> dict[str, Any]:
        """The variant-specific build options (networks.variants.VariantSpec.options), each a
        field of this config under the same name."""
        return {name: getattr(self, name) for name in option_names()}

    def objective(self) -> ObjectiveConfig:
        """The loss settings: every ObjectiveConfig field this config has under the same name
        (the weights, the contrastive settings, max_epochs) and the schedule, ``loss_schedule``
        here."""
        shared = {f.name for f in fields(ObjectiveConfig)} & {f.name for f in fields(self)}
        return ObjectiveConfig(**{name: getattr(self, name) for name in shared},
                               schedule=self.loss_schedule)

    def jitter(self) -> JitterConfig:
        """The per-sequence misalignment of training slices (``sequence_jitter``)."""
        return JitterConfig(self.sequence_jitter,
                            JITTER_MISALIGNMENT.scaled(self.jitter_strength))

    @classmethod
    def field_defaults(cls) -> dict[str, Any]:
        """Every field's default: what a config written before a field existed meant by it."""
        return {f.name: field_default(f) for f in fields(cls)} | LEGACY_DEFAULTS

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def default_run_dir(dataset: str, model: str, vit_name: str, folds: int = 0) -> str:
    """``runs/<dataset>_<model>_<vit_name>`` (``_cv<K>`` for K-fold cross-validation): where
    train.py writes a run and test.py looks for it when given the same flags."""
    return f"runs/{dataset}_{model}_{vit_name}" + (f"_cv{folds}" if folds else "")


def poly_lr(base_lr: float, iteration: int, max_iterations: int, power: float) -> float:
    """Polynomial decay from ``base_lr`` to 0 over ``max_iterations`` (per iteration)."""
    return base_lr * (1.0 - min(iteration, max_iterations) / max_iterations) ** power


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    checkpoint: Path
    epochs: int
    iterations: int
    final_loss: float
    seconds: float
    best_score: float | None = None
    best_epoch: int | None = None


def train(config: TrainConfig, *, resume: bool = False, replace: bool = False) -> TrainResult:
    """Train ``config.model`` on the processed training slices; one process or torchrun's N.

    Under torchrun each process trains on its share of every global batch of
    ``config.batch_size`` slices (DistributedDataParallel, SyncBatchNorm, Dice over the global
    batch), so N processes compute what one would. Rank 0 logs, validates and saves.
    ``resume`` continues from ``<output_dir>/checkpoint_last.pth`` exactly. ``replace``: the
    folder may hold an older run, whose best and final checkpoints are removed once this run
    writes its first checkpoint (never before: a run that fails to start destroys nothing).
    """
    start_time = time.perf_counter()
    with distributed_session(resolve_device(config.device)) as context:
        return _train(config, context, resume, start_time, replace)


def _train(config: TrainConfig, context: DistContext, resume: bool,
           start_time: float, replace: bool = False) -> TrainResult:
    device = context.device
    if config.batch_size % context.world_size:
        raise ValueError(f"batch_size {config.batch_size} must be divisible by the "
                         f"{context.world_size} processes")
    seed_everything(config.seed)
    run_dir = Path(config.output_dir)
    payload = (load_training_checkpoint(run_dir / CHECKPOINT_LAST, config.to_dict(),
                                        defaults=TrainConfig.field_defaults())
               if resume else None)
    if context.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for path in remove_stale_temporaries(run_dir, "checkpoint_*"):
            log.info("removed %s, left by a save that was killed", path.name)
        write_json(run_dir / "config.json", config.to_dict())

    layout = ProcessedLayout(Path(config.root_path),
                             list_dir=Path(config.list_dir) if config.list_dir else None)
    if context.is_main:
        layout.names("train")  # may write the list file: one process only
    context.barrier()
    names = layout.names("train", create=False)
    layout.check_disjoint()
    layout.check_slices(names)
    train_names, val_names = split_validation_cases(
        names, config.val_fraction if config.val_every else 0.0)
    data = _training_data(config, context, layout, train_names)
    dataset, sampler, loader = data.dataset, data.sampler, data.loader

    priors = (load_prior_bank(config.priors_path, required=canonical_names())
              if config.priors_path is not None else None)
    model = create_network(config.model, backbone=config.vit_name, img_size=config.img_size,
                           num_classes=config.num_classes, sequence=config.sequence,
                           priors=priors,
                           pretrained=None if resume else config.pretrained_path,
                           dropout_rate=config.vit_dropout, **config.network_options())
    if context.distributed:
        model = convert_batchnorm(model, device)
    model.to(device)
    # Early-fusion TransUNet sees only the zeroed channels; the I_MMSeg variants get the mask.
    step = TrainStep(model, TrainingObjective(config.num_classes, config.objective()).to(device),
                     _optimizer(config, model), device, amp=config.amp,
                     pass_mask=config.sequence_dropout > 0 or data.missing is not None,
                     pass_labelled=bool(data.unlabelled))
    optimizer, scaler = step.optimizer, step.scaler
    tracker = BestModelTracker(config.patience)
    start_epoch, iteration = (_restore(payload, model, step, tracker) if payload is not None
                              else (0, 0))
    if context.distributed:
        # Before the contrastive term starts, immseg's embedding layers get no gradient.
        step.forward = DistributedDataParallel(
            step.forward, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=capabilities_of(model).training_outputs)
    max_iterations = config.max_epochs * len(loader)
    schedule = {"kind": "poly", "base_lr": config.base_lr, "power": config.poly_power,
                "max_iterations": max_iterations}
    prior_record = None if priors is None else {
        "model_id": priors.model_id, "text_hash": priors.text_hash, "path": config.priors_path}
    validation = (validation_volumes(layout, val_names)
                  if context.is_main and val_names else [])
    log.info("training %s on %d slices x %d process(es) (%d iterations from %d, %d validation "
             "volumes, device %s) -> %s", describe(model), len(dataset), context.world_size,
             max_iterations, iteration, len(validation), device, run_dir)

    # Checkpoints of an older run in this folder, removed at this run's first save.
    stale = {CHECKPOINT_BEST, CHECKPOINT_FINAL} if replace and not resume else set()

    def save(path: Path, epoch: int, resumable: bool = False) -> None:
        # A finite last loss does not make the step after it finite: never save broken weights
        # over the last good checkpoint.
        bad = non_finite_tensors(model.state_dict())
        if bad:
            raise FloatingPointError(f"non-finite weights after epoch {epoch} ({bad[:3]}...); "
                                     f"{path.name} not written, the previous one is kept")
        save_training_checkpoint(
            path, model=model, optimizer=optimizer, scaler=scaler, epoch=epoch,
            iteration=iteration, train_config=config.to_dict(), schedule=schedule,
            tracker=tracker.state_dict(), priors=prior_record,
            preprocess=layout.recorded_preprocessing(),
            objective=step.objective.state_dict(), resumable=resumable)
        for name in stale - {path.name}:
            (run_dir / name).unlink(missing_ok=True)
        stale.clear()

    loss_value, completed = math.nan, start_epoch
    final = run_dir / CHECKPOINT_FINAL
    writer = SummaryWriter(str(run_dir / "tensorboard")) if context.is_main else None
    try:
        for epoch in range(start_epoch, config.max_epochs):
            model.train()
            sampler.set_epoch(epoch)
            epoch_losses = []
            progress = tqdm(loader, desc=f"epoch {epoch + 1}/{config.max_epochs}",
                            unit="batch", leave=False, disable=not context.is_main)
            for batch in progress:
                lr = poly_lr(config.base_lr, iteration, max_iterations, config.poly_power)
                step.set_lr(lr)
                parts = step(batch, epoch)
                iteration += 1
                loss_value = parts["total"]
                epoch_losses.append(loss_value)
                progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
                if writer is not None:
                    writer.add_scalar("train/lr", lr, iteration)
                    for name, value in parts.items():
                        writer.add_scalar(f"train/{name}", value, iteration)
            log.info("epoch %d/%d: mean loss %.4f, lr %.2e", epoch + 1, config.max_epochs,
                     float(np.mean(epoch_losses)) if epoch_losses else math.nan, lr)
            stop = False
            if validation and (epoch + 1) % config.val_every == 0:
                stop = _validate(model, validation, config, tracker, epoch, device, writer,
                                 functools.partial(save, run_dir / CHECKPOINT_BEST, epoch + 1))
            completed = epoch + 1
            if context.is_main:
                save(run_dir / CHECKPOINT_LAST, completed, resumable=True)
            if broadcast_flag(stop, context):
                log.info("early stop after epoch %d: no gain for %d validations", epoch + 1,
                         config.patience)
                break
        if context.is_main:
            save(final, completed)
        context.barrier()
    finally:
        if writer is not None:
            writer.close()
    seconds = time.perf_counter() - start_time
    log.info("finished in %.1f s; final checkpoint %s", seconds, final)
    best = tracker.best_score if tracker.best_epoch is not None else None
    return TrainResult(run_dir, final, completed, iteration, loss_value, seconds, best,
                       tracker.best_epoch)


def _restore(payload: dict, model: torch.nn.Module, step: TrainStep,
             tracker: BestModelTracker) -> tuple[int, int]:
    """Put a resumable checkpoint's state back (weights, optimiser, scaler, best-model tracker,
    objective, RNG); the epoch and iteration to continue from."""
    model.load_state_dict(payload["model"])
    step.optimizer.load_state_dict(payload["optimizer"])
    step.scaler.load_state_dict(payload["scaler"])
    if payload.get("tracker"):
        tracker.load_state_dict(payload["tracker"])
    if payload.get("objective"):
        step.objective.load_state_dict(payload["objective"])
    restore_rng_state(payload["rng"])
    return int(payload["epoch"]), int(payload["iteration"])


@dataclass(frozen=True)
class TrainingData:
    """What one run trains on: the slices, their per-epoch order and the loader over them."""

    dataset: SliceDataset
    sampler: EpochIndices | TwoStreamSampler
    loader: DataLoader
    #: sequences each case lacks (``None``: every case has every sequence)
    missing: MissingSequences | None
    #: training cases whose labels are left unused (semi-supervised runs)
    unlabelled: frozenset[str]


def _training_data(config: TrainConfig, context: DistContext, layout: ProcessedLayout,
                   train_names: list[str]) -> TrainingData:
    """The dataset, sampler and loader of ``train_names`` under ``config``'s missing sequences,
    labelled fraction, dropout and jitter, this process's share of every global batch."""
    # Dropout masks, like augmentation, are functions of (seed, epoch, sample index): the same
    # samples lose the same sequences on 1 or N processes, and a resumed epoch replays them.
    missing = _missing_sequences(config, layout, train_names)
    unlabelled = unlabelled_cases(train_names, config.labelled_fraction, config.seed)
    # A semi-supervised epoch (and its labelled-only baseline) takes one pass's steps.
    steps = steps_per_pass(len(train_names), config.batch_size) if unlabelled else 0
    if unlabelled and config.consistency_weight == 0:
        # Nothing would train on them: the baseline of the labelled cases alone.
        train_names = [name for name in train_names if case_of(name) not in unlabelled]
        log.info("consistency_weight 0: the %d unlabelled cases are left out; the labelled "
                 "slices fill every batch of the same %d steps per epoch", len(unlabelled),
                 steps)
        unlabelled = frozenset()
    dataset = SliceDataset(layout, train_names, config.img_size,
                           AugmentConfig() if config.augment else None, seed=config.seed,
                           sequence_dropout=config.sequence_dropout,
                           jitter=config.jitter() if config.sequence_jitter > 0 else None,
                           missing=missing,
                           unlabelled=unlabelled)
    # The shuffle is a pure function of (seed, epoch): a resumed epoch replays its batches. The
    # epoch travels with each index to the (persistent) workers.
    sampler: EpochIndices | TwoStreamSampler
    if steps:
        is_labelled = [case_of(name) not in unlabelled for name in train_names]
        sampler = TwoStreamSampler(
            [i for i, flag in enumerate(is_labelled) if flag],
            [i for i, flag in enumerate(is_labelled) if not flag], config.batch_size,
            config.labelled_per_batch or config.batch_size // 2, steps, seed=config.seed,
            num_replicas=context.world_size, rank=context.rank)
    else:
        sampler = EpochIndices(DistributedSampler(
            dataset, num_replicas=context.world_size, rank=context.rank, shuffle=True,
            seed=config.seed, drop_last=False))
    loader = DataLoader(dataset, batch_size=config.batch_size // context.world_size,
                        sampler=sampler, num_workers=config.num_workers,
                        # Its own generator keeps worker seeding off the global RNG (dropout).
                        generator=torch.Generator().manual_seed(config.seed),
                        pin_memory=context.device.type == "cuda", drop_last=False,
                        persistent_workers=config.num_workers > 0)
    return TrainingData(dataset, sampler, loader, missing, unlabelled)


def unlabelled_cases(train_names: list[str], fraction: float, seed: int) -> frozenset[str]:
    """The training cases whose labels a semi-supervised run leaves unused: all but
    ``max(1, round(fraction * n))`` of the ``n`` cases, drawn with ``seed`` (a function of the
    sorted case ids, the same on every process)."""
    if fraction >= 1:
        return frozenset()
    cases = sorted({case_of(name) for name in train_names})
    keep = max(1, round(fraction * len(cases)))
    order = np.random.default_rng([seed, 22]).permutation(len(cases))
    unlabelled = frozenset(cases[int(i)] for i in order[keep:])
    log.info("semi-supervised: %d of %d training cases labelled, %d used without labels",
             keep, len(cases), len(unlabelled))
    return unlabelled


def _missing_sequences(config: TrainConfig, layout: ProcessedLayout,
                       train_names: list[str]) -> MissingSequences | None:
    """What the training cases lack: the data's own record (``<root>/missing.json``, written by
    preprocess_data.py --allow_missing) and the run's ``missing_file``. The latter may cover a
    whole dataset (one file for every fold of a cross-validation: each fold uses its training
    cases' entries); a case the data root does not hold means it belongs to other data and is
    refused."""
    records = []
    own = layout.root / DATASET_MISSING_FILE
    if own.is_file():
        records.append((own, MissingSequences.read(own)))
    if config.missing_file:
        records.append((Path(config.missing_file), MissingSequences.read(config.missing_file)))
    if not records:
        return None
    known = layout.case_ids()
    missing = MissingSequences({})
    for path, record in records:
        unknown = sorted(set(record.absent) - known)
        if unknown:
            raise ValueError(f"{path}: names {len(unknown)} case(s) that {layout.root} does not "
                             f"hold ({', '.join(unknown[:4])}...); it was drawn for other data")
        missing = missing.union(record)
    cases = {case_of(name) for name in train_names}
    counts = missing.counts(cases)
    log.info("missing sequences (%s): of %d training cases, absent %s",
             ", ".join(str(path) for path, _ in records), len(cases),
             ", ".join(f"{name} {count}" for name, count in counts.items()))
    return missing


def _optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW as released, or SGD with momentum (whose steps, unlike Adam's, do not amplify
    rounding noise in near-zero gradients: the choice for bit-level comparisons)."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.base_lr, momentum=0.9,
                               weight_decay=config.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=config.base_lr,
                             weight_decay=config.weight_decay)


def _validate(model: torch.nn.Module, volumes: list, config: TrainConfig,
              tracker: BestModelTracker, epoch: int, device: torch.device,
              writer: SummaryWriter | None, save_best: Callable[[], None]) -> bool:
    """Score the validation volumes, log them, keep the best model; True means stop early."""
    metrics = validate(model, volumes, config.img_size, device)
    score = metrics.mean_dice(PATHOLOGY_GROUPS)
    summary = metrics.summary()
    if tracker.update(epoch + 1, score):
        save_best()
    log.info("validation after epoch %d: mean pathology Dice %.4f (best %.4f at epoch %s)",
             epoch + 1, score, tracker.best_score, tracker.best_epoch)
    if writer is not None:
        writer.add_scalar("val/mean_pathology_dice", score, epoch + 1)
        for group, values in summary.items():
            writer.add_scalar(f"val/dice/{group}", values["dice"]["mean"], epoch + 1)
        writer.add_image("val/overlay", _overlay(model, volumes[0], config, device), epoch + 1)
    model.train()
    return tracker.should_stop


def _overlay(model: torch.nn.Module, volume: Any, config: TrainConfig,
             device: torch.device) -> np.ndarray:
    """Overlay picture (CHW uint8) of the first validation volume's prediction."""
    # Eval mode matters beyond BatchNorm statistics: in training mode the global-batch norms
    # would wait for the other ranks, which do not validate.
    model.eval()
    prediction = predict_volume(model, volume.image, config.img_size, device)
    image = np.asarray(volume.image, dtype=np.float32)
    return overlay_grid(image / max(float(image.max()), 1e-6), volume.label, prediction)
