from __future__ import annotations

from collections import Counter
from itertools import combinations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, SequentialSampler

from datasets.augment import AugmentConfig, drop_sequences
from datasets.dataset import EpochIndices, SliceDataset, resize_slice
from datasets.labels import MODALITIES
from datasets.processed import ProcessedLayout, write_test_volume, write_training_slice


@pytest.fixture()
def layout(tmp_path) -> ProcessedLayout:
    layout = ProcessedLayout(tmp_path)
    rng = np.random.default_rng(0)
    for index in range(4):
        label = np.zeros((32, 32), np.uint8)
        label[8:20, 10:24] = 1 + index % 3
        for modality in MODALITIES:
            write_training_slice(layout.item_path(modality, "train", f"case0001_slice{index:03d}"),
                                 rng.random((32, 32)) * 255, label)
    for modality in MODALITIES:
        write_test_volume(layout.item_path(modality, "test_vol", "case0002"),
                          rng.random((2, 32, 32)) * 255, np.ones((2, 32, 32), np.uint8),
                          (8.0, 1.0, 1.0))
    return layout


def test_items_are_tensors_of_the_requested_size(layout):
    dataset = SliceDataset(layout, layout.names("train"), img_size=64)
    item = dataset[1]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert item["label"].shape == (64, 64) and item["label"].dtype == torch.int64
    assert set(item["label"].unique().tolist()) == {0, 2}
    assert item["name"] == "case0001_slice001"


def test_augmentation_is_a_function_of_seed_epoch_and_index(layout):
    names = layout.names("train")
    first = SliceDataset(layout, names, 32, AugmentConfig(), seed=5)
    second = SliceDataset(layout, names, 32, AugmentConfig(), seed=5)
    for epoch in (0, 3):
        first.set_epoch(epoch)
        second.set_epoch(epoch)
        for index in range(len(names)):
            assert torch.equal(first[index]["image"], second[index]["image"])
    first.set_epoch(0)
    second.set_epoch(1)
    assert any(not torch.equal(first[i]["image"], second[i]["image"]) for i in range(len(names)))


def test_resize_keeps_labels_integral():
    label = np.zeros((32, 32), np.uint8)
    label[8:24, 8:24] = 3
    image, resized = resize_slice(np.ones((3, 32, 32), np.float32), label, 64)
    assert image.shape == (3, 64, 64) and resized.shape == (64, 64)
    assert set(np.unique(resized)) == {0, 3}
    assert (resized == 3).sum() == 4 * (label == 3).sum()


def test_empty_list_raises(layout):
    with pytest.raises(ValueError, match="empty list"):
        SliceDataset(layout, [], 32)


def test_drop_sequences_reaches_every_proper_subset_at_the_documented_rates():
    rng = np.random.default_rng(11)
    draws = 12000
    masks = np.stack([drop_sequences(3, 0.5, rng) for _ in range(draws)])
    assert masks.shape == (draws, 3) and masks.dtype == bool
    assert masks.any(axis=1).all()  # never every sequence dropped
    dropped = ~masks.all(axis=1)
    assert abs(dropped.mean() - 0.5) < 0.015
    counts = Counter(tuple(np.flatnonzero(row).tolist()) for row in masks[dropped])
    # Kept subsets: 3 of size 2 (one dropped) and 3 of size 1 (two dropped), each p / 6.
    expected = {kept for size in (1, 2) for kept in combinations(range(3), size)}
    assert set(counts) == expected
    assert (1,) in counts  # LGE (channel 1) alone
    for kept, count in counts.items():
        assert abs(count / draws - 0.5 / 6) < 0.01, kept
    never = np.stack([drop_sequences(3, 0.0, rng) for _ in range(200)])
    assert never.all()
    assert drop_sequences(1, 0.9, np.random.default_rng(0)).tolist() == [True]


@pytest.mark.parametrize("args", [(3, 1.0), (3, -0.1), (3, float("nan")), (0, 0.5), (True, 0.5)])
def test_drop_sequences_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        drop_sequences(*args, np.random.default_rng(0))


def test_sequence_dropout_zeroes_the_dropped_channels_and_keeps_the_rest(layout):
    names = layout.names("train") * 16  # 64 items: enough for every kind of mask to occur
    plain = SliceDataset(layout, names, 32, AugmentConfig(), seed=7)
    dropping = SliceDataset(layout, names, 32, AugmentConfig(), seed=7, sequence_dropout=0.6)
    seen = set()
    for index in range(len(names)):
        full, item = plain[index], dropping[index]
        assert full["sequence_mask"].all() and full["sequence_mask"].dtype == torch.bool
        mask = item["sequence_mask"]
        assert mask.shape == (3,) and mask.any()
        seen.add(tuple(mask.tolist()))
        # Dropped channels are exactly zero; the others, augmentation included, are unchanged.
        assert torch.equal(item["image"][~mask], torch.zeros_like(item["image"][~mask]))
        assert torch.equal(item["image"][mask], full["image"][mask])
        assert torch.equal(item["label"], full["label"])
    assert len(seen) == 7  # all present, and the six non-empty proper subsets


def test_sequence_dropout_is_a_function_of_seed_epoch_and_index(layout):
    names = layout.names("train") * 8
    first = SliceDataset(layout, names, 32, None, seed=3, sequence_dropout=0.5)
    second = SliceDataset(layout, names, 32, None, seed=3, sequence_dropout=0.5)

    def masks(dataset, epoch):
        dataset.set_epoch(epoch)
        return torch.stack([dataset[i]["sequence_mask"] for i in range(len(names))])

    assert torch.equal(masks(first, 2), masks(second, 2))
    assert not torch.equal(masks(first, 0), masks(first, 1))
    other_seed = SliceDataset(layout, names, 32, None, seed=4, sequence_dropout=0.5)
    assert not torch.equal(masks(first, 0), masks(other_seed, 0))
    with pytest.raises(ValueError, match="sequence_dropout"):
        SliceDataset(layout, names, 32, sequence_dropout=1.0)


def test_persistent_loader_workers_follow_the_epoch(layout):
    """Workers keep the dataset copy they started with; the epoch must come with the index."""
    dataset = SliceDataset(layout, layout.names("train") * 4, 32, AugmentConfig(), seed=1,
                           sequence_dropout=0.5)
    sampler = EpochIndices(SequentialSampler(dataset))
    loader = DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=1,
                        persistent_workers=True)
    served = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        served.append(torch.cat([batch["image"] for batch in loader]))
    for epoch in range(2):
        expected = torch.stack([dataset[(epoch, i)]["image"] for i in range(len(dataset))])
        assert torch.equal(served[epoch], expected)
    assert not torch.equal(served[0], served[1])
    dataset.set_epoch(1)
    assert torch.equal(dataset[3]["image"], dataset[(1, 3)]["image"])
    assert list(EpochIndices(range(3))) == [(0, 0), (0, 1), (0, 2)] and len(sampler) == 16
