"""Torch datasets over the processed layout: training slices and whole test volumes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from datasets.augment import AugmentConfig, augment
from datasets.processed import ProcessedLayout


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


class SliceDataset(Dataset):
    """The three sequences of one training slice, stacked as ``[S, H, W]``, with its label.

    Augmentation randomness is a pure function of ``(seed, epoch, index)``: results do not depend
    on the number of loader workers or on which worker serves an index, which makes runs
    reproducible and resumable. Call :meth:`set_epoch` before each epoch.
    """

    def __init__(self, layout: ProcessedLayout, names: list[str], img_size: int,
                 augment_config: AugmentConfig | None = None, seed: int = 0) -> None:
        if img_size < 1:
            raise ValueError(f"img_size must be >= 1, got {img_size}")
        if not names:
            raise ValueError(f"{layout.root}: empty list of training slices")
        self.layout = layout
        self.names = list(names)
        self.img_size = img_size
        self.augment_config = augment_config
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict:
        name = self.names[index]
        image, label = self.layout.read_slice(name)
        image, label = resize_slice(image, label, self.img_size)
        if self.augment_config is not None:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            image, label = augment(image, label, self.augment_config, rng)
        return {"image": torch.from_numpy(np.ascontiguousarray(image)),
                "label": torch.from_numpy(np.ascontiguousarray(label).astype(np.int64)),
                "name": name}


@dataclass(frozen=True)
class TestVolume:
    """One held-out volume: image ``[D, S, H, W]`` in [0, 1], label ``[D, H, W]``, spacing mm."""

    name: str
    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]


def iter_test_volumes(layout: ProcessedLayout, names: list[str]):
    """Yield :class:`TestVolume` one at a time (volumes are read lazily, files closed at once)."""
    for name in names:
        image, label, spacing = layout.read_volume(name)
        yield TestVolume(name, image, label, spacing)
