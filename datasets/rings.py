"""Synthetic ring slices in the processed layout: a myocardium-like ring with a scar and an edema
sector under sequence-like contrasts. Tests, and the benchmarks that must run without NIfTI
readers, train and test on them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from datasets.labels import MODALITIES
from datasets.processed import ProcessedLayout, write_test_volume, write_training_slice


def ring_slice(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A myocardium-like ring with a scar and an edema sector, and sequence-like contrasts."""
    y, x = np.mgrid[:size, :size] - (size - 1) / 2 + rng.uniform(-3, 3, size=2)[:, None, None]
    radius, angle = np.hypot(y, x), np.arctan2(y, x)
    label = np.zeros((size, size), np.uint8)
    ring = (radius > size * 0.18) & (radius < size * 0.3)
    label[ring] = 1
    label[ring & (angle > 0) & (angle < 1.2)] = 2
    label[ring & (angle >= 1.2) & (angle < 2.2)] = 3
    bssfp = np.where(radius <= size * 0.18, 230, np.where(ring, 60, 120))
    lge = np.where(label == 2, 240, np.where(ring, 20, 110))
    t2w = np.where(label >= 2, 220, np.where(ring, 90, 40))
    image = np.stack([bssfp, lge, t2w]).astype(np.float32) + rng.normal(0, 5, (3, size, size))
    return np.clip(image, 0, 255), label


def write_ring_dataset(root: Path, *, train_cases: int, slices_per_case: int,
                       test_cases: tuple[str, ...] = (), size: int = 32, seed: int = 0) -> Path:
    """A processed layout of ring slices: ``case0001..`` training slices and test volumes."""
    layout = ProcessedLayout(root)
    rng = np.random.default_rng(seed)
    for case in range(1, train_cases + 1):
        for index in range(slices_per_case):
            image, label = ring_slice(size, rng)
            for channel, modality in enumerate(MODALITIES):
                write_training_slice(
                    layout.item_path(modality, "train", f"case{case:04d}_slice{index:03d}"),
                    image[channel], label)
    for case_id in test_cases:
        slices = [ring_slice(size, rng) for _ in range(slices_per_case)]
        labels = np.stack([label for _, label in slices])
        for channel, modality in enumerate(MODALITIES):
            write_test_volume(layout.item_path(modality, "test_vol", case_id),
                              np.stack([image[channel] for image, _ in slices]), labels,
                              (10.0, 1.0, 1.0))
    return root
