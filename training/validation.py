"""Validation during training: a case-level split, in-memory volumes, scoring, best-model tracking.

The split holds out whole cases, never single slices: neighbouring slices of one heart are nearly
identical, so a slice-level split would leak the validation set into training. Validation slices
are stacked back into per-case volumes and scored exactly as held-out test volumes are (same
:func:`~networks.inference.predict_volume`, same :class:`~evaluation.metrics.MetricAccumulator`),
so validation and test numbers mean the same thing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from datasets.processed import DEFAULT_SPACING, ProcessedDataError, ProcessedLayout
from evaluation.metrics import MetricAccumulator
from networks.inference import predict_volume

#: Training slice names: ``<case>_slice<NNN>`` (the case id may itself contain underscores).
_SLICE_NAME = re.compile(r"^(?P<case>.+)_slice(?P<index>\d+)$")


def parse_slice_name(name: str) -> tuple[str, int]:
    """``(case id, slice number)`` of a training slice name; ValueError if it does not parse."""
    match = _SLICE_NAME.match(name) if isinstance(name, str) else None
    if match is None:
        raise ValueError(f"training slice name {name!r} is not of the form <case>_slice<NNN>")
    return match["case"], int(match["index"])


def _group_by_case(names: Iterable[str]) -> dict[str, list[tuple[int, str]]]:
    """case id -> [(slice number, name)] sorted by slice number; duplicates are errors."""
    cases: dict[str, list[tuple[int, str]]] = {}
    for name in names:
        case, index = parse_slice_name(name)
        cases.setdefault(case, []).append((index, name))
    for case, slices in cases.items():
        slices.sort()
        numbers = [index for index, _ in slices]
        if len(set(numbers)) != len(numbers):
            repeated = sorted({n for n in numbers if numbers.count(n) > 1})
            raise ValueError(f"case {case!r} lists slice number(s) {repeated} more than once")
    return cases


def split_validation_cases(train_names: list[str],
                           fraction: float) -> tuple[list[str], list[str]]:
    """Split training slices into (train, validation) names by whole cases.

    Case ids are sorted and ``round(fraction * n_cases)`` of them (at least one) are taken at
    evenly spaced positions, i.e. every ``1 / fraction``-th case: deterministic, independent of
    the list order and spread over the whole id range (ids often encode the acquisition site or
    period). Both outputs keep the order of ``train_names``. ``fraction == 0`` returns every name
    for training, unparsed, so layouts with other naming still train without validation.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, int | float):
        raise ValueError(f"validation fraction must be a number in [0, 1), got {fraction!r}")
    if not (math.isfinite(fraction) and 0.0 <= fraction < 1.0):
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    names = list(train_names)
    if len(set(names)) != len(names):
        raise ValueError("training slice names contain duplicates")
    if fraction == 0.0:
        return names, []
    cases = sorted(_group_by_case(names))
    n_cases = len(cases)
    n_val = max(1, round(fraction * n_cases))
    if n_val >= n_cases:
        raise ValueError(f"validation fraction {fraction} would hold out all {n_cases} training "
                         "case(s), leaving nothing to train on")
    stride = n_cases / n_val
    held_out = {cases[int((i + 0.5) * stride)] for i in range(n_val)}
    train, validation = [], []
    for name in names:
        (validation if parse_slice_name(name)[0] in held_out else train).append(name)
    return train, validation


@dataclass(frozen=True)
class ValidationVolume:
    """One validation case: image ``[D, S, H, W]`` in [0, 1], label ``[D, H, W]``, spacing mm.

    The same fields and formats as a test case whose ROI was given
    (:class:`evaluation.test_cases.TestCase`), so the same inference and metric code serve
    both; ``slice_names`` records which slices were stacked, in order.
    """

    name: str
    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]
    slice_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.image.ndim != 4 or self.label.ndim != 3:
            raise ValueError(f"{self.name}: expected image [D, S, H, W] and label [D, H, W], got "
                             f"{self.image.shape} and {self.label.shape}")
        depth, _, height, width = self.image.shape
        if self.label.shape != (depth, height, width):
            raise ValueError(f"{self.name}: label shape {self.label.shape} does not match image "
                             f"shape {self.image.shape}")
        if len(self.slice_names) != depth:
            raise ValueError(f"{self.name}: {len(self.slice_names)} slice names for {depth} "
                             "slices")


def validation_volumes(layout: ProcessedLayout,
                       slice_names: Sequence[str]) -> list[ValidationVolume]:
    """Read the validation slices once and stack each case's slices (by slice number).

    Images come from :meth:`ProcessedLayout.read_slice`, so they are float32 in [0, 1] with the
    sequences in ``layout.modalities`` order, as :meth:`ProcessedLayout.read_volume` gives test
    volumes. Training slices carry no spacing; :data:`datasets.processed.DEFAULT_SPACING` is used.
    Volumes are returned sorted by case id.
    """
    if not slice_names:
        raise ValueError("no validation slices given")
    volumes = []
    for case, slices in sorted(_group_by_case(slice_names).items()):
        images, labels = [], []
        for _, name in slices:
            image, label = layout.read_slice(name)
            if images and image.shape != images[0].shape:
                raise ProcessedDataError(
                    f"{layout.root}: slice {name} has shape {image.shape}, but earlier slices of "
                    f"case {case} have {images[0].shape}; cannot stack them into a volume")
            images.append(image)
            labels.append(label)
        volumes.append(ValidationVolume(
            name=case, image=np.stack(images).astype(np.float32, copy=False),
            label=np.stack(labels).astype(np.uint8, copy=False), spacing=DEFAULT_SPACING,
            slice_names=tuple(name for _, name in slices)))
    return volumes


def validate(model: nn.Module, volumes: Sequence[ValidationVolume], img_size: int,
             device: torch.device, batch_size: int = 32) -> MetricAccumulator:
    """Predict and score every validation volume; the model's train/eval mode is restored.

    Returns a fresh accumulator (Dice and HD95 per group); :meth:`MetricAccumulator.mean_dice`
    gives the selection score. HD95 costs little next to inference at validation sizes.
    """
    if not volumes:
        raise ValueError("no validation volumes given")
    metrics = MetricAccumulator()
    was_training = model.training
    model.eval()
    try:
        for volume in volumes:
            prediction = predict_volume(model, volume.image, img_size, device, batch_size)
            metrics.update(volume.name, prediction, volume.label, volume.spacing)
    finally:
        model.train(was_training)
    return metrics


class BestModelTracker:
    """Tracks the best validation score and early stopping across validation rounds.

    A score is a new best when it beats the best so far by more than ``min_delta`` (the first
    score always is). ``patience`` counts validation rounds, not epochs, without a new best;
    ``None`` never stops. :meth:`state_dict` goes into checkpoints so a resumed run keeps its
    best score and patience count instead of restarting them.
    """

    def __init__(self, patience: int | None, min_delta: float = 0.0) -> None:
        if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int)
                                     or patience < 1):
            raise ValueError(f"patience must be None or an integer >= 1, got {patience!r}")
        if not (isinstance(min_delta, int | float) and math.isfinite(min_delta)
                and min_delta >= 0):
            raise ValueError(f"min_delta must be a finite number >= 0, got {min_delta!r}")
        self.patience = patience
        self.min_delta = float(min_delta)
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.last_epoch: int | None = None
        self.rounds_without_improvement = 0

    def update(self, epoch: int, score: float) -> bool:
        """Record the score of validation after ``epoch``; True when it is a new best."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        if self.last_epoch is not None and epoch <= self.last_epoch:
            raise ValueError(f"epoch {epoch} is not after the last validated epoch "
                             f"{self.last_epoch}")
        score = float(score)
        if not math.isfinite(score):
            raise ValueError(f"validation score must be finite, got {score}")
        self.last_epoch = epoch
        if self.best_score is None or score > self.best_score + self.min_delta:
            self.best_score, self.best_epoch = score, epoch
            self.rounds_without_improvement = 0
            return True
        self.rounds_without_improvement += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.rounds_without_improvement >= self.patience

    def state_dict(self) -> dict[str, Any]:
        """Progress only; patience and min_delta come from the run's config."""
        return {"best_score": self.best_score, "best_epoch": self.best_epoch,
                "last_epoch": self.last_epoch,
                "rounds_without_improvement": self.rounds_without_improvement}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        expected = {"best_score", "best_epoch", "last_epoch", "rounds_without_improvement"}
        if not isinstance(state, Mapping) or set(state) != expected:
            raise ValueError(f"tracker state must have exactly the keys {sorted(expected)}, got "
                             f"{sorted(state) if isinstance(state, Mapping) else state!r}")
        best_score, best_epoch = state["best_score"], state["best_epoch"]
        last_epoch, rounds = state["last_epoch"], state["rounds_without_improvement"]
        if (best_score is None) != (best_epoch is None) or (best_epoch is None) != (
                last_epoch is None):
            raise ValueError(f"inconsistent tracker state {dict(state)}")
        if not isinstance(rounds, int) or rounds < 0 or (best_epoch is None and rounds):
            raise ValueError(f"inconsistent tracker state {dict(state)}")
        if best_epoch is not None and not (
                isinstance(best_epoch, int) and isinstance(last_epoch, int)
                and 0 <= best_epoch <= last_epoch and math.isfinite(float(best_score))):
            raise ValueError(f"inconsistent tracker state {dict(state)}")
        self.best_score = None if best_score is None else float(best_score)
        self.best_epoch, self.last_epoch = best_epoch, last_epoch
        self.rounds_without_improvement = rounds
