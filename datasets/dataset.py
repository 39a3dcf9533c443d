"""Torch datasets over the processed layout: training slices and whole test volumes."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset, Sampler

from datasets.augment import AugmentConfig, augment, drop_sequences
from datasets.missing import MissingSequences
from datasets.processed import ProcessedLayout, case_of
from datasets.sequence_jitter import JitterConfig, jitter_sequences


def resize_slice(image: np.ndarray, label: np.ndarray | None,
                 size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Resize ``[..., H, W]`` image (linear) and ``[..., H, W]`` label (nearest) to ``size``."""
    height, width = image.shape[-2:]
    if (height, width) == (size, size):
        return image, label
    factors = (1,) * (image.ndim - 2) + (size / height, size / width)
    image = ndimage.zoom(image, factors, order=1, grid_mode=True, mode="grid-constant")
    if label is not None:
        label = ndimage.zoom(label, factors[-label.ndim:], order=0, grid_mode=True,
                             mode="grid-constant")
    return image.astype(np.float32), label


#: Extra seed word of the sequence-dropout stream: enabling dropout leaves augmentation as it was.
#: Never 0: numpy's SeedSequence ignores trailing zeros, so 0 would replay the augmentation
#: stream keyed by (seed, epoch, index).
_DROPOUT_STREAM = 1
#: Seed word of the per-sequence misalignment stream (datasets.sequence_jitter).
_JITTER_STREAM = 2
#: Seed word before the draw number of a slice drawn more than once in an epoch (the two-stream
#: batches of semi-supervised runs): each draw gets its own augmentation, the first the usual one.
_REPEAT_STREAM = 3


class EpochIndices(Sampler):
    """Yields ``(epoch, index)`` for each index of ``sampler``: the epoch travels with the index.

    Loader workers hold the copy of the dataset made when they started, so with persistent
    workers a :meth:`SliceDataset.set_epoch` in the main process never reaches them and every
    epoch would replay the first one's augmentation (and a resumed run would replay the epoch it
    resumed at). Here the epoch is part of the key the workers receive. ``set_epoch`` also
    reaches the wrapped sampler (DistributedSampler's shuffle).
    """

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((epoch, int(index)) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class SliceDataset(Dataset):
    """The three sequences of one training slice, stacked as ``[S, H, W]``, with its label.

    Items also carry ``sequence_mask`` ``[S]`` (bool, True = present), drawn with
    ``sequence_dropout`` by :func:`datasets.augment.drop_sequences`; dropped channels are zeroed
    after augmentation (whose noise would otherwise refill them), the absent-sequence convention
    of :mod:`networks.sequences`. Sequences a case lacks (``missing``, see
    :mod:`datasets.missing`) are absent in every epoch; dropout then draws among the others.
    Slices of ``unlabelled`` cases (semi-supervised training) carry an all-background label that
    is never read and ``labelled = False``: their real label does not leave this class.

    Augmentation and dropout randomness are pure functions of ``(seed, epoch, index)``: results
    depend neither on the number of loader workers nor on which worker or rank serves an index,
    which makes runs reproducible, resumable and the same on 1 or N processes. Index it with
    ``(epoch, index)`` (:class:`EpochIndices` does so for a loader), ``(epoch, index, draw)``
    for the ``draw``-th repeat of a slice within an epoch (:class:`datasets.two_stream.
    TwoStreamSampler`), or with ``index`` after :meth:`set_epoch`.
    """

    def __init__(self, layout: ProcessedLayout, names: list[str], img_size: int,
                 augment_config: AugmentConfig | None = None, seed: int = 0,
                 sequence_dropout: float = 0.0, jitter: JitterConfig | None = None,
                 missing: MissingSequences | None = None,
                 unlabelled: frozenset[str] = frozenset()) -> None:
        if img_size < 1:
            raise ValueError(f"img_size must be >= 1, got {img_size}")
        if not names:
            raise ValueError(f"{layout.root}: empty list of training slices")
        if not 0.0 <= sequence_dropout < 1.0:
            raise ValueError(f"sequence_dropout must lie in [0, 1), got {sequence_dropout}")
        self.layout = layout
        self.names = list(names)
        self.img_size = img_size
        self.augment_config = augment_config
        self.seed = seed
        self.sequence_dropout = float(sequence_dropout)
        self.jitter = jitter
        self.missing = missing
        self.unlabelled = frozenset(unlabelled)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, key: int | tuple[int, ...]) -> dict:
        epoch, index, draw = (*key, 0)[:3] if isinstance(key, tuple) else (self.epoch, key, 0)
        name = self.names[index]
        image, label = self.layout.read_slice(name)
        image, label = resize_slice(image, label, self.img_size)
        words = [self.seed, epoch, index] + ([_REPEAT_STREAM, draw] if draw else [])
        if self.augment_config is not None:
            rng = np.random.default_rng(words)
            image, label = augment(image, label, self.augment_config, rng)
        if self.jitter is not None and self.jitter.probability > 0:
            rng = np.random.default_rng([*words, _JITTER_STREAM])
            image, _ = jitter_sequences(image, self.jitter, rng)
        present = (self.missing.presence(name) if self.missing is not None
                   else np.ones(len(image), dtype=bool))
        if self.sequence_dropout > 0:
            rng = np.random.default_rng([*words, _DROPOUT_STREAM])
            have = np.flatnonzero(present)
            present = np.zeros_like(present)
            present[have[drop_sequences(len(have), self.sequence_dropout, rng)]] = True
        if not present.all():
            image = image * present[:, None, None].astype(image.dtype)
        labelled = case_of(name) not in self.unlabelled
        if not labelled:
            label = np.zeros_like(label)
        return {"image": torch.from_numpy(np.ascontiguousarray(image)),
                "label": torch.from_numpy(np.ascontiguousarray(label).astype(np.int64)),
                "sequence_mask": torch.from_numpy(present),
                "labelled": torch.tensor(labelled),
                "name": name}
