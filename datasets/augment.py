"""Training augmentation for multi-sequence slices with intensities in [0, 1].

Spatial transforms (90-degree rotations, flips, a free rotation/scale/shift) are drawn once per
sample and applied to every sequence and the label, so the sequences stay registered and the label
stays true. Intensity transforms (brightness, gamma, noise) are drawn per sequence, since each
sequence has its own scanner scaling, and keep values inside [0, 1]: gamma is only meaningful there,
and clipping after noise keeps the input range the network saw in training.

Sequence dropout (:func:`drop_sequences`) teaches the fusion networks to segment from any subset
of the sequences, the situation test.py and predict.py meet when a sequence is missing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of each transform; ``AugmentConfig.off()`` disables all."""

    p_rot90_flip: float = 0.5
    p_affine: float = 0.5
    max_rotation_deg: float = 20.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    max_shift_fraction: float = 0.1
    p_brightness: float = 0.3
    brightness_range: tuple[float, float] = (0.8, 1.2)
    p_gamma: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)
    p_noise: float = 0.2
    noise_std: float = 0.03

    def __post_init__(self) -> None:
        for name in ("p_rot90_flip", "p_affine", "p_brightness", "p_gamma", "p_noise"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        for name in ("scale_range", "brightness_range", "gamma_range"):
            low, high = getattr(self, name)
            if not 0.0 < low <= high:
                raise ValueError(f"{name} must satisfy 0 < low <= high, got {(low, high)}")
        if self.max_rotation_deg < 0 or self.max_shift_fraction < 0 or self.noise_std < 0:
            raise ValueError("rotation, shift and noise magnitudes must be >= 0")

    @classmethod
    def off(cls) -> AugmentConfig:
        return cls(p_rot90_flip=0.0, p_affine=0.0, p_brightness=0.0, p_gamma=0.0, p_noise=0.0)


def augment(image: np.ndarray, label: np.ndarray, config: AugmentConfig,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Augment ``image [S, H, W]`` in [0, 1] and ``label [H, W]`` together."""
    if image.ndim != 3 or image.shape[1:] != label.shape:
        raise ValueError(f"image [S, H, W] and label [H, W] expected, got {image.shape}, "
                         f"{label.shape}")
    if rng.random() < config.p_rot90_flip:
        turns = int(rng.integers(4))
        image, label = np.rot90(image, turns, axes=(1, 2)), np.rot90(label, turns)
        if rng.random() < 0.5:
            image, label = image[:, :, ::-1], label[:, ::-1]
    if rng.random() < config.p_affine:
        image, label = _random_affine(image, label, config, rng)
    image = np.array(image, dtype=np.float32)  # writable copy, never a view of the caller's data
    for channel in image:
        if rng.random() < config.p_brightness:
            channel *= rng.uniform(*config.brightness_range)
            np.clip(channel, 0.0, 1.0, out=channel)
        if rng.random() < config.p_gamma:
            np.clip(channel, 0.0, 1.0, out=channel)
            channel **= rng.uniform(*config.gamma_range)
        if rng.random() < config.p_noise:
            channel += rng.normal(0.0, config.noise_std, size=channel.shape).astype(np.float32)
            np.clip(channel, 0.0, 1.0, out=channel)
    return image, np.ascontiguousarray(label)


def _random_affine(image: np.ndarray, label: np.ndarray, config: AugmentConfig,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Rotation about the centre, isotropic scale and shift in one resampling per array."""
    height, width = label.shape
    angle = np.deg2rad(rng.uniform(-config.max_rotation_deg, config.max_rotation_deg))
    scale = rng.uniform(*config.scale_range)
    shift = rng.uniform(-config.max_shift_fraction, config.max_shift_fraction, size=2) * (height,
                                                                                           width)
    cos, sin = np.cos(angle), np.sin(angle)
    # Maps output pixel coordinates to input coordinates (what ndimage.affine_transform expects).
    matrix = np.array([[cos, -sin], [sin, cos]]) / scale
    centre = np.array([(height - 1) / 2, (width - 1) / 2])
    offset = centre - matrix @ (centre + shift)
    warped = np.stack([ndimage.affine_transform(channel, matrix, offset, order=1, mode="constant",
                                                cval=0.0) for channel in image])
    warped_label = ndimage.affine_transform(label, matrix, offset, order=0, mode="constant",
                                            cval=0)
    return warped, warped_label


def drop_sequences(num_sequences: int, probability: float,
                   rng: np.random.Generator) -> np.ndarray:
    """``[S]`` bool presence mask: with ``probability`` a random non-empty proper subset is lost.

    The number dropped is uniform over ``1..S-1`` and the dropped ones uniform among subsets of
    that size; with the three sequences every 1- and 2-sequence input (LGE alone included) is
    then equally likely. A sample never loses all sequences.
    """
    if isinstance(num_sequences, bool) or not isinstance(num_sequences, int) or num_sequences < 1:
        raise ValueError(f"num_sequences must be an int >= 1, got {num_sequences!r}")
    if not 0.0 <= probability < 1.0:
        raise ValueError(f"probability must lie in [0, 1), got {probability}")
    present = np.ones(num_sequences, dtype=bool)
    if rng.random() < probability and num_sequences > 1:
        count = int(rng.integers(1, num_sequences))
        present[rng.choice(num_sequences, size=count, replace=False)] = False
    return present
