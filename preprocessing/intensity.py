"""Robust linear intensity normalisation to [0, 255]."""

from __future__ import annotations

import numpy as np


def normalise_to_255(stack: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5,
                     source: str = "<array>") -> tuple[np.ndarray, tuple[float, float]]:
    """Map the ``[low_pct, high_pct]`` percentile range linearly onto [0, 255] and clip.

    Percentiles, not min/max, so that a few hot pixels (flow artefacts, surface coil glare) do not
    compress the myocardium into a handful of grey levels. Returns the image and the (low, high)
    intensities used, which the manifest records.
    """
    if not 0.0 <= low_pct < high_pct <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {low_pct}, "
                         f"{high_pct}")
    low, high = np.percentile(stack, [low_pct, high_pct])
    if not high > low:
        raise ValueError(f"{source}: constant intensities ({low:g}); cannot normalise")
    window = (float(low), float(high))
    return apply_window(stack, window), window


def apply_window(stack: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Map ``window = (low, high)`` linearly onto [0, 255] and clip (float32)."""
    low, high = window
    scaled = (stack.astype(np.float32) - low) * (255.0 / (high - low))
    return np.clip(scaled, 0.0, 255.0)
