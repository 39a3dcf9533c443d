"""The training objective of every variant: weighted CE + Dice, per-sequence deep supervision and
the pixel-text contrastive term.

Two schedules (``ObjectiveConfig.schedule``):

* ``constant`` (ours, the default):
  ``total = seg(main) + aux_weight * mean_s seg(aux_s) + w_c(epoch) * mean_s contrastive_s``
  with ``w_c`` = ``contrastive_weight`` from ``contrastive_start_epoch`` on and 0 before. The
  weights are the release's, its staging is not: one stage is simpler to tune on short budgets.
* ``release_staged`` (the released I_MMSeg code's, scaled to the run's length): during the first
  third of the epochs (0-99 of 300 in the release) only the per-sequence branches train,
  ``total = sum_s seg(aux_s) + 0.1 * c``; afterwards
  ``total = seg(main) + 0.5 * sum_s seg(aux_s) + 0.05 * c``, with ``c`` the contrastive term
  (counted from ``contrastive_start_epoch``). Per-sequence losses are *summed* there, as
  released, over the sequences present.

Two options balance the sequences when some are often missing (in the spirit of PASSION and
DMAF-Net; ours, not the release's):

* ``distill_weight``: self-distillation from the fused prediction to each present sequence's
  branch, ``T^2 * KL(softmax(main / T) || softmax(aux_s / T))`` with the fused side detached,
  averaged over the pixels of the samples where ``s`` is present, then over those sequences;
* ``balance``: per-sequence weights of the auxiliary term that follow each branch's relative
  progress. Each branch's loss is tracked (an exponential mean, 0.9) against its first value;
  a branch whose loss has fallen least gets the largest weight,
  ``w_s = n * r_s / sum_present r`` with ``r_s = ema_s / first_s``. The tracked values are
  state (:meth:`TrainingObjective.state_dict`), saved in resumable checkpoints.

Semi-supervised training (``labelled`` rows, in the spirit of CMC; ours): every supervised term
counts only the labelled samples, and unlabelled samples train through cross-sequence
consistency, weighted ``consistency_weight`` times a ramp ``exp(-5 (1 - t)^2)`` over the first
``consistency_rampup`` of the epochs:

* prediction agreement: for each pair of sequences present in a sample, the mean squared
  difference of their branches' class probabilities;
* channel-wise semantic consistency: for each such pair, the mean squared difference of their
  encoder bottlenecks' channel affinities (``f f^T`` of the spatially L2-normalised channels).

Both carry gradients into both branches of a pair (the released CMC code computes them without
gradient, so they train nothing there).

``seg = ce_weight * CE + dice_weight * Dice``. Networks
without auxiliary outputs (the TransUNet baselines) get the main term only. Auxiliary logits at
H/4 are upsampled to the label size rather than the labels shrunk: shrinking labels by nearest
sampling drops most of a two-pixel-thick scar.

The contrastive term ``c`` takes the network's form (``IMMSegConfig.contrastive``): ours, every
H/4 pixel embedding against the class texts with area-reduced soft labels
(:class:`~networks.contrastive.PixelTextContrastiveLoss`), or the release's, a supervised contrast
of pixels drawn from each sequence's raw skips at H/2, H/4 and H/8 with the class texts
(:func:`~networks.contrastive.supervised_contrast`). The release's form is fixed where it
crashes as released: 4 text rows and 4 text labels (it pairs 4 rows with 8 labels, which only runs
under DataParallel on exactly 2 GPUs).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datasets.labels import MODALITIES
from networks.capabilities import capabilities_of
from networks.contrastive import (
    RELEASE_VIEWS,
    PixelTextContrastiveLoss,
    downsample_labels,
    sample_class_pixels,
    supervised_contrast,
)
from networks.immseg import IMMSegOutput
from networks.losses import SegmentationLoss, global_sum
from networks.prior_attention import check_sequence_mask
from utils import ConfigRecord, require_finite_fields

Outputs = Tensor | IMMSegOutput
SCHEDULES: tuple[str, ...] = ("constant", "release_staged")
#: The release's stage boundary: epoch 100 of 300.
_RELEASE_STAGE_FRACTION = 100 / 300


@dataclass(frozen=True)
class TermWeights:
    """Weights of one epoch: main term, per-sequence term (``aux_sum``: summed over present
    sequences rather than averaged), contrastive term."""

    main: float
    aux: float
    aux_sum: bool
    contrastive: float


@dataclass(frozen=True)
class ObjectiveConfig(ConfigRecord):
    """Loss weights and schedule (defaults: the released I_MMSeg recipe)."""

    ce_weight: float = 0.2
    dice_weight: float = 0.8
    aux_weight: float = 0.4
    contrastive_weight: float = 0.1
    contrastive_start_epoch: int = 20
    temperature: float = 0.07
    class_weights: tuple[float, ...] | None = None
    #: "constant" (ours) or "release_staged" (see the module docstring)
    schedule: str = "constant"
    #: the run's length, which the staged schedule's first third is taken of
    max_epochs: int = 300
    #: self-distillation from the fused prediction to each sequence's branch (0: off)
    distill_weight: float = 0.0
    distill_temperature: float = 2.0
    #: per-sequence auxiliary weights that follow each branch's relative progress
    balance: bool = False
    #: semi-supervised: weight of the cross-sequence consistency on unlabelled samples, reached
    #: after the first ``consistency_rampup`` (a fraction) of the epochs
    consistency_weight: float = 0.1
    consistency_rampup: float = 0.3

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if isinstance(self.max_epochs, bool) or self.max_epochs < 1:
            raise ValueError(f"max_epochs must be an int >= 1, got {self.max_epochs!r}")
        require_finite_fields(self, "ce_weight", "dice_weight", "aux_weight", "contrastive_weight")
        if isinstance(self.contrastive_start_epoch, bool) or self.contrastive_start_epoch < 0:
            raise ValueError(f"contrastive_start_epoch must be an int >= 0, got "
                             f"{self.contrastive_start_epoch!r}")
        require_finite_fields(self, "temperature", "distill_temperature", positive=True)
        require_finite_fields(self, "distill_weight", "consistency_weight")
        if self.consistency_weight < 0:
            raise ValueError(f"consistency_weight must be >= 0, got {self.consistency_weight}")
        if not 0.0 <= self.consistency_rampup <= 1.0:
            raise ValueError(f"consistency_rampup must lie in [0, 1], got "
                             f"{self.consistency_rampup}")
        if self.distill_weight < 0:
            raise ValueError(f"distill_weight must be >= 0, got {self.distill_weight}")
        if not isinstance(self.balance, bool):
            raise ValueError(f"balance must be a bool, got {self.balance!r}")
        if self.class_weights is not None:
            object.__setattr__(self, "class_weights", tuple(float(w) for w in self.class_weights))



def forward_outputs(model: nn.Module, images: Tensor,
                    sequence_mask: Tensor | None = None) -> Outputs:
    """Training outputs of any variant: everything ``forward_train`` gives to a network that
    declares ``training_outputs``, else the logits."""
    if capabilities_of(model).training_outputs:
        return model.forward_train(images, sequence_mask)
    if sequence_mask is not None:
        raise ValueError(f"{type(model).__name__} cannot take a sequence mask")
    return model(images)


class TrainingForward(nn.Module):
    """``forward(images)`` = :func:`forward_outputs` of the wrapped model.

    DistributedDataParallel synchronises gradients only for what runs through its wrapped
    module's ``forward``; wrapping this (not the network) lets it see ``forward_train``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, sequence_mask: Tensor | None = None) -> Outputs:
        return forward_outputs(self.model, images, sequence_mask)


class TrainingObjective(nn.Module):
    """``forward(outputs, labels, epoch, sequence_mask=None) -> (loss, parts)``.

    ``parts`` holds floats for logging: ``seg`` (main), ``ce`` and ``dice`` (main), ``aux`` and
    ``contrastive`` (means over sequences, when the network has them) and ``total``.

    Every term is computed over the global batch: its sums are all-reduced
    (:func:`networks.losses.global_sum`) before the ratios, so N processes compute what one
    computes on the whole batch, class weights included. Auxiliary and contrastive terms of a
    sequence count only the samples where it is present. Absent rows enter every sum with weight
    zero instead of being cut out, so each rank runs the same operations and collectives whatever
    its own samples lack (a rank skipping a sequence would call one all-reduce fewer and hang the
    others, and would leave that sequence's branch out of its backward). A sequence absent from
    the whole global batch is left out of the mean over sequences.
    """

    def __init__(self, num_classes: int, config: ObjectiveConfig | None = None,
                 num_sequences: int = len(MODALITIES)) -> None:
        super().__init__()
        self.config = config or ObjectiveConfig()
        self.segmentation = SegmentationLoss(num_classes, self.config.ce_weight,
                                             self.config.dice_weight, self.config.class_weights)
        self.contrastive = PixelTextContrastiveLoss(self.config.temperature)
        # Progress of each sequence's branch (config.balance): its first loss and its running
        # mean, NaN until the branch has been seen.
        self.register_buffer("first_aux", torch.full((num_sequences,), float("nan")))
        self.register_buffer("ema_aux", torch.full((num_sequences,), float("nan")))

    #: Smoothing of the tracked per-branch losses.
    EMA = 0.9

    def contrastive_weight(self, epoch: int) -> float:
        """Weight of the contrastive term in 0-based ``epoch``."""
        return self.weights(epoch).contrastive

    def weights(self, epoch: int) -> TermWeights:
        """Every term's weight in 0-based ``epoch`` under the configured schedule."""
        config = self.config
        started = epoch >= config.contrastive_start_epoch
        if config.schedule == "constant":
            return TermWeights(1.0, config.aux_weight, False,
                               config.contrastive_weight if started else 0.0)
        stage_end = max(1, round(config.max_epochs * _RELEASE_STAGE_FRACTION))
        if epoch < stage_end:
            return TermWeights(0.0, 1.0, True, 0.1 if started else 0.0)
        return TermWeights(1.0, 0.5, True, 0.05 if started else 0.0)

    def consistency_ramp(self, epoch: int) -> float:
        """The consistency weight in 0-based ``epoch`` (the ramp over the first epochs)."""
        config = self.config
        length = config.consistency_rampup * config.max_epochs
        if length <= 0 or epoch >= length:
            return config.consistency_weight
        return config.consistency_weight * math.exp(-5.0 * (1.0 - epoch / length) ** 2)

    def forward(self, outputs: Outputs, labels: Tensor, epoch: int,
                sequence_mask: Tensor | None = None,
                labelled: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        """``labelled`` ([B] bool, None: all) marks the samples whose labels count. Given, it
        makes the run semi-supervised on every rank alike (never decided from one rank's
        samples, which would make the ranks' collectives differ)."""
        if isinstance(outputs, Tensor):
            if labelled is not None:
                raise ValueError("unlabelled samples need a network with per-sequence branches")
            loss, parts = self.segmentation(outputs, labels)
            return loss, {"seg": parts["total"], "ce": parts["ce"], "dice": parts["dice"],
                          "total": parts["total"]}
        if not isinstance(outputs, IMMSegOutput):
            raise ValueError(f"outputs must be logits or IMMSegOutput, got "
                             f"{type(outputs).__name__}")
        weights = self.weights(epoch)
        if labelled is not None:
            labelled = labelled.to(labels.device)
        main, main_parts = self.segmentation(outputs.logits, labels, labelled)
        total = weights.main * main
        parts = {"seg": main_parts["total"], "ce": main_parts["ce"], "dice": main_parts["dice"]}
        available = _presence(sequence_mask, labels, len(outputs.aux_logits))
        # Supervised terms see the labelled samples; the consistency the unlabelled ones.
        present = available if labelled is None else available & labelled

        weight = self.consistency_ramp(epoch)
        if labelled is not None and weight > 0:
            term = self._consistency(outputs, available & ~labelled)
            total = total + weight * term
            parts["consistency"] = float(term.detach())

        if weights.aux > 0 and outputs.aux_logits:
            aux, count = self._auxiliary(outputs.aux_logits, labels, present)
            # Summed over the sequences present (release_staged), else their mean.
            total = total + weights.aux * (aux * count if weights.aux_sum else aux)
            parts["aux"] = float(aux.detach())

        if self.config.distill_weight > 0 and outputs.aux_logits:
            # Over the labelled samples: the fused prediction is the supervised teacher there.
            distill = self._distillation(outputs.logits, outputs.aux_logits, present)
            total = total + self.config.distill_weight * distill
            parts["distill"] = float(distill.detach())

        weight = weights.contrastive
        if weight > 0 and (outputs.scale_embeddings or outputs.pixel_embeddings):
            term = (self._release_contrast(outputs, labels, present)
                    if outputs.scale_embeddings else
                    self._pixel_text(outputs.pixel_embeddings, outputs.class_embeddings, labels,
                                     present))
            total = total + weight * term
            parts["contrastive"] = float(term.detach())

        parts["total"] = float(total.detach())
        if not math.isfinite(parts["total"]):
            raise FloatingPointError(f"non-finite loss: {parts}")
        return total, parts

    def _auxiliary(self, aux_logits: Sequence[Tensor], labels: Tensor,
                   present: Tensor) -> tuple[Tensor, Tensor]:
        """Mean over sequences of :class:`SegmentationLoss` on each one's present rows, and how
        many sequences are present in the global batch.

        Each sequence's loss comes from its global-batch sums (``SegmentationLoss.statistics``).
        """
        seg = self.segmentation
        sums = torch.stack([
            torch.cat([rows.sum().float()[None],
                       seg.statistics(_upsample(logits, labels.shape[-2:]), labels, rows)])
            for logits, rows in zip(aux_logits, present, strict=True)])
        totals = global_sum(sums)
        loss, _, _ = seg.from_statistics(totals[:, 1:])
        if self.config.balance:
            return self._balanced(loss, totals[:, 0] > 0), (totals[:, 0] > 0).sum()
        return _mean_over_present(loss, totals[:, 0]), (totals[:, 0] > 0).sum()

    def branch_weights(self, present: Tensor) -> Tensor:
        """``[S]`` weights of the sequences' auxiliary losses from their tracked progress: mean 1
        over the ``present`` ones, 0 for the others (1 each before anything is tracked)."""
        ratio = self.ema_aux / self.first_aux
        ratio = torch.where(present & torch.isfinite(ratio), ratio, 0.0)
        if not bool((ratio > 0).any()):
            return present.float()
        ratio = torch.where(present & (ratio == 0), ratio[ratio > 0].mean(), ratio)
        return present.sum() * ratio / ratio.sum()

    def _balanced(self, loss: Tensor, present: Tensor) -> Tensor:
        """Weighted mean of the per-sequence losses (``config.balance``); updates the tracked
        progress with this step's values (identical on every rank: global sums)."""
        with torch.no_grad():
            if self.first_aux.numel() != loss.numel():
                raise ValueError(f"the objective tracks {self.first_aux.numel()} sequences, the "
                                 f"network has {loss.numel()}")
            value = loss.detach().float()
            fresh = present & torch.isnan(self.first_aux)
            self.first_aux = torch.where(fresh, value, self.first_aux)
            self.ema_aux = torch.where(
                present, torch.where(torch.isnan(self.ema_aux), value,
                                     self.EMA * self.ema_aux + (1 - self.EMA) * value),
                self.ema_aux)
            weights = self.branch_weights(present)
        return (weights * torch.where(present, loss, 0.0)).sum() / present.sum().clamp_min(1)

    def _consistency(self, outputs: IMMSegOutput, rows: Tensor) -> Tensor:
        """Mean over pairs of sequences (and over the two kinds) of the cross-sequence
        disagreement on the ``rows`` samples ([S, B] bool: unlabelled and present)."""
        totals = global_sum(_consistency_terms(outputs, rows))
        if totals.numel() == 0:
            return rows.new_zeros((), dtype=torch.float32)
        means = torch.cat([totals[:, 0] / totals[:, 1].clamp_min(1),
                           totals[:, 2] / totals[:, 3].clamp_min(1)])
        counted = torch.cat([totals[:, 1], totals[:, 3]]) > 0
        return torch.where(counted, means, 0.0).sum() / counted.sum().clamp_min(1)

    def _distillation(self, logits: Tensor, aux_logits: Sequence[Tensor],
                      present: Tensor) -> Tensor:
        """Mean over present sequences of the tempered KL from the detached fused prediction to
        each branch, over the pixels of the samples where the branch's sequence is present."""
        temperature = self.config.distill_temperature
        target = torch.softmax(logits.detach().float() / temperature, dim=1)
        log_target = torch.log(target.clamp_min(1e-8))
        sums = []
        for aux, rows in zip(aux_logits, present, strict=True):
            log_branch = torch.log_softmax(_upsample(aux, logits.shape[-2:]).float()
                                           / temperature, dim=1)
            per_pixel = (target * (log_target - log_branch)).sum(dim=1)  # [B, H, W]
            weight = rows.float()[:, None, None].expand_as(per_pixel)
            sums.append(torch.stack([(per_pixel * weight).sum(), weight.sum()]))
        totals = global_sum(torch.stack(sums))
        per_sequence = totals[:, 0] / totals[:, 1].clamp_min(1) * temperature ** 2
        return _mean_over_present(per_sequence, totals[:, 1])

    def _pixel_text(self, pixel_embeddings: Sequence[Tensor], class_embeddings: Tensor,
                    labels: Tensor, present: Tensor) -> Tensor:
        """Mean over sequences of :class:`PixelTextContrastiveLoss` on each one's present rows.

        Each sequence's loss comes from its global-batch sums
        (``PixelTextContrastiveLoss.sums``); the area-reduced labels are shared by all.
        """
        contrastive = self.contrastive
        sums = []
        targets: Tensor | None = None
        for pixels, rows in zip(pixel_embeddings, present, strict=True):
            logits = contrastive.logits(pixels, class_embeddings)
            if targets is None or targets.shape[-2:] != logits.shape[-2:]:
                targets = downsample_labels(labels, tuple(logits.shape[-2:]), logits.shape[1],
                                            contrastive.ignore_index)
            sums.append(torch.cat([rows.sum().float()[None],
                                   contrastive.sums(logits, targets, rows).flatten()]))
        totals = global_sum(torch.stack(sums))
        loss = contrastive.from_sums(totals[:, 1:].unflatten(1, (2, -1)))
        return _mean_over_present(loss, totals[:, 0])

    def _release_contrast(self, outputs: IMMSegOutput, labels: Tensor,
                          present: Tensor) -> Tensor:
        """The released code's contrast (networks.contrastive.supervised_contrast): per sequence,
        summed over H/2, H/4, H/8, pixels drawn from the samples where the sequence is present
        (:data:`~networks.contrastive.RELEASE_VIEWS` per class and image, its ignored classes
        left out) together with the class texts; the mean over the sequences present.

        Computed on this process's samples (the release, under DataParallel, gathers its
        replicas' outputs first): with torchrun each rank contrasts its own share of the batch,
        unlike the other terms, which are global-batch exact.
        """
        terms = []
        for scales, ignore, rows in zip(outputs.scale_embeddings, outputs.ignored_classes,
                                        present, strict=True):
            if not bool(rows.any()):
                continue
            term = labels.new_zeros((), dtype=torch.float32)
            for embedding, texts, views in zip(scales, outputs.scale_texts, RELEASE_VIEWS,
                                               strict=True):
                pixels, classes = sample_class_pixels(embedding, labels, views, ignore, rows)
                text_classes = torch.arange(len(texts), device=labels.device)
                term = term + supervised_contrast(
                    torch.cat([pixels.float(), texts.float()]),
                    torch.cat([classes, text_classes]), self.config.temperature)
            terms.append(term)
        if not terms:
            return labels.new_zeros((), dtype=torch.float32)
        return torch.stack(terms).mean()


def channel_affinity(features: Tensor) -> Tensor:
    """``[B, C, C]``: products of the spatially L2-normalised channels of ``[B, C, h, w]``."""
    flat = F.normalize(features.float().flatten(2), dim=2)
    return flat @ flat.transpose(1, 2)


def _consistency_terms(outputs: IMMSegOutput, rows: Tensor) -> Tensor:
    """``[P, 4]`` sums per pair of sequences: prediction disagreement and its sample count,
    affinity disagreement and its sample count, over the samples where both are in ``rows``."""
    probabilities = [torch.softmax(a.float(), dim=1) for a in outputs.aux_logits]
    affinities = [channel_affinity(f) for f in outputs.sequence_features]
    sums = []
    for s, t in itertools.combinations(range(len(probabilities)), 2):
        both = (rows[s] & rows[t]).float()
        agreement = ((probabilities[s] - probabilities[t]) ** 2).sum(dim=1).mean(dim=(1, 2))
        row = [(agreement * both).sum(), both.sum()]
        if affinities:
            semantic = ((affinities[s] - affinities[t]) ** 2).mean(dim=(1, 2))
            row += [(semantic * both).sum(), both.sum()]
        else:
            row += [both.new_zeros(()), both.new_zeros(())]
        sums.append(torch.stack(row))
    return torch.stack(sums) if sums else rows.new_zeros((0, 4), dtype=torch.float32)


def _presence(sequence_mask: Tensor | None, labels: Tensor, sequences: int) -> Tensor:
    """``[S, B]`` bool: per sequence, the samples where it is present."""
    batch = labels.shape[0]
    if sequence_mask is None:
        return torch.ones(sequences, batch, dtype=torch.bool, device=labels.device)
    check_sequence_mask(sequence_mask, batch, sequences)
    return sequence_mask.to(labels.device).T


def _upsample(logits: Tensor, size: Sequence[int]) -> Tensor:
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def _mean_over_present(terms: Tensor, count: Tensor) -> Tensor:
    """Mean of ``terms [S]`` over the sequences with ``count [S]`` > 0 (global sample counts)."""
    present = count > 0
    return torch.where(present, terms, 0.0).sum() / present.sum().clamp_min(1)
