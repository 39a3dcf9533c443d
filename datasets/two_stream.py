"""Batches with a fixed share of labelled slices, for semi-supervised training (ours).

Drawing a semi-supervised run's batches uniformly from all slices leaves the supervised terms a
handful of samples per step: at 10 % labelled cases a batch of 8 holds 0.8 labelled slices on
average, and often none. The usual remedy in semi-supervised segmentation (a "two-stream" batch)
is used here: every global batch holds ``labelled_per_batch`` labelled slices and the rest
unlabelled ones, each stream cycling through its own shuffled slices as often as the epoch needs.
An epoch has a fixed number of steps (by default those of one pass over all the training
slices), so a run on the labelled cases alone (no unlabelled stream: whole batches of labelled
slices) takes exactly as many optimiser steps as the semi-supervised run it is compared with.

Everything is a function of ``(seed, epoch)``: a resumed epoch replays its batches, and one
process or N draw the same global batches (rank ``r`` takes the items ``k`` with ``k % N == r``
of each global batch, labelled first, so every rank gets an equal share of each stream).
Items are ``(epoch, index, draw)`` keys for :class:`datasets.dataset.SliceDataset`: ``draw``
counts earlier draws of the same slice in the epoch, so repeats get their own augmentation.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

#: Seed word of the batch-composition stream (kept apart from augmentation's).
_STREAM = 5


class TwoStreamSampler(Sampler):
    """``steps`` global batches of ``batch_size``: ``labelled_per_batch`` from ``labelled``,
    the rest from ``unlabelled`` (all from ``labelled`` when ``unlabelled`` is empty); this
    rank's items, in batch order, as ``(epoch, index, draw)``."""

    def __init__(self, labelled: Sequence[int], unlabelled: Sequence[int], batch_size: int,
                 labelled_per_batch: int, steps: int, seed: int = 0, num_replicas: int = 1,
                 rank: int = 0) -> None:
        if not labelled:
            raise ValueError("a two-stream batch needs labelled slices")
        if set(labelled) & set(unlabelled):
            raise ValueError("a slice cannot be both labelled and unlabelled")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} of {num_replicas} processes")
        if batch_size < 1 or batch_size % num_replicas:
            raise ValueError(f"batch_size {batch_size} must be a positive multiple of the "
                             f"{num_replicas} process(es)")
        if unlabelled and not 1 <= labelled_per_batch < batch_size:
            raise ValueError(f"labelled_per_batch must lie in [1, {batch_size - 1}], got "
                             f"{labelled_per_batch}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.labelled = [int(i) for i in labelled]
        self.unlabelled = [int(i) for i in unlabelled]
        self.batch_size = batch_size
        self.labelled_per_batch = labelled_per_batch if self.unlabelled else batch_size
        self.steps = steps
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[list[tuple[int, int]]]:
        """This epoch's global batches as ``(index, draw)`` pairs, labelled items first."""
        rng = np.random.default_rng([self.seed, self.epoch, _STREAM])
        streams = [_Stream(self.labelled, rng), _Stream(self.unlabelled, rng)]
        counts = (self.labelled_per_batch, self.batch_size - self.labelled_per_batch)
        return [[item for stream, count in zip(streams, counts, strict=True)
                 for item in stream.take(count)] for _ in range(self.steps)]

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        epoch = self.epoch
        for batch in self.global_batches():
            for index, draw in batch[self.rank::self.num_replicas]:
                yield epoch, index, draw

    def __len__(self) -> int:
        return self.steps * self.batch_size // self.num_replicas


def steps_per_pass(total: int, batch_size: int) -> int:
    """Steps of one pass over ``total`` slices in global batches of ``batch_size``."""
    return math.ceil(total / batch_size)


class _Stream:
    """Endless shuffled passes over ``indices``; each item with its draw number in the epoch."""

    def __init__(self, indices: Sequence[int], rng: np.random.Generator) -> None:
        self.indices = list(indices)
        self.rng = rng
        self.order: list[int] = []
        self.draws: dict[int, int] = {}

    def take(self, count: int) -> list[tuple[int, int]]:
        items = []
        for _ in range(count):
            if not self.order:
                self.order = [self.indices[i] for i in self.rng.permutation(len(self.indices))]
            index = self.order.pop()
            items.append((index, self.draws.get(index, 0)))
            self.draws[index] = self.draws.get(index, 0) + 1
        return items
