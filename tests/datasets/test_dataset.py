from __future__ import annotations

import numpy as np
import pytest
import torch

from datasets.augment import AugmentConfig
from datasets.dataset import SliceDataset, iter_test_volumes, resize_slice
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


def test_test_volumes_iterate_lazily(layout):
    volumes = list(iter_test_volumes(layout, layout.names("test_vol")))
    assert [v.name for v in volumes] == ["case0002"]
    assert volumes[0].image.shape == (2, 3, 32, 32) and volumes[0].spacing == (8.0, 1.0, 1.0)


def test_empty_list_raises(layout):
    with pytest.raises(ValueError, match="empty list"):
        SliceDataset(layout, [], 32)
