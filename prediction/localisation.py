"""Finding the heart without a label, so the ROI can be cropped as training cropped it.

Training crops a ``roi_size`` box centred on the centroid of the labelled myocardium over all
slices (:func:`preprocessing.pipeline.roi_origin`). A new patient has no label, but the trained
network is itself a myocardium detector, so the network's own belief replaces the label:

1. the network runs over the whole ``crop_size`` grid in overlapping ``roi_size`` windows (the
   input size it was trained on, so its receptive field and scale are right); softmax outputs
   of overlapping windows are averaged with Gaussian weights, because a window's border pixels
   see little context and are least reliable;
2. the foreground probability (classes 1-3) is summed over the slices: the myocardium stacks up
   at the same place on every short-axis slice, while false positives (chest wall, RV, liver)
   rarely do;
3. the largest connected region of that evidence, by summed probability rather than by area,
   is the heart, and its probability-weighted centroid replaces the label centroid; with crisp
   probabilities the two are identical.

If nothing reaches the evidence threshold the grid centre is used and the location says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from networks.inference import window_probabilities
from utils import ConfigRecord

WEIGHTINGS: tuple[str, ...] = ("gaussian", "uniform")
#: Gaussian sigma as a fraction of the window side (nnU-Net's choice for sliding windows).
_SIGMA_FRACTION = 1.0 / 8.0
#: Smallest weight, so pixels that only window borders cover still get a (poor) estimate.
_MIN_WEIGHT = 1e-3


@dataclass(frozen=True)
class HeartLocation(ConfigRecord):
    """Heart centre and ROI on the crop grid, in grid pixels (``(row, col)``)."""

    centre: tuple[float, float]
    origin: tuple[int, int]
    size: int
    found: bool
    component_pixels: int
    evidence: float



def window_origins(grid_size: int, window: int, stride: int) -> list[int]:
    """Start positions covering ``[0, grid_size)`` with ``window``-wide steps of ``stride``.

    The last window is flush with the far edge, so no window leaves the grid (no padding).
    """
    if not 0 < window <= grid_size:
        raise ValueError(f"need 0 < window <= grid_size, got {window}, {grid_size}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    origins = list(range(0, grid_size - window + 1, stride))
    if origins[-1] != grid_size - window:
        origins.append(grid_size - window)
    return origins


def window_weights(size: int, weighting: str = "gaussian") -> np.ndarray:
    """``[size, size]`` weights of one window's pixels when windows are averaged (max 1)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if weighting == "uniform":
        return np.ones((size, size), dtype=np.float32)
    offsets = np.arange(size) - (size - 1) / 2
    profile = np.exp(-0.5 * (offsets / (size * _SIGMA_FRACTION)) ** 2)
    weights = np.outer(profile, profile)
    return np.maximum(weights / weights.max(), _MIN_WEIGHT).astype(np.float32)


def sliding_probabilities(model: nn.Module, images: np.ndarray, present: Sequence[str],
                          window: int, stride: int, img_size: int, device: torch.device, *,
                          weighting: str = "gaussian", batch_size: int = 32) -> np.ndarray:
    """Fused softmax ``[D, K, H, W]`` of ``images [D, S, H, W]`` (square, in [0, 255]).

    Every window of every slice goes through the network in one batched pass.
    """
    if images.ndim != 4 or images.shape[2] != images.shape[3]:
        raise ValueError(f"expected square images [D, S, H, W], got {images.shape}")
    depth, _, size, _ = images.shape
    origins = window_origins(size, window, stride)
    positions = [(row, col) for row in origins for col in origins]
    crops = np.stack([images[:, :, row:row + window, col:col + window]
                      for row, col in positions], axis=1)
    probabilities = window_probabilities(
        model, crops.reshape(-1, *crops.shape[2:]), present, img_size, device, batch_size)
    probabilities = probabilities.reshape(depth, len(positions), -1, window, window)
    weights = window_weights(window, weighting)
    fused = np.zeros((depth, probabilities.shape[2], size, size), dtype=np.float32)
    total = np.zeros((size, size), dtype=np.float32)
    for index, (row, col) in enumerate(positions):
        fused[:, :, row:row + window, col:col + window] += probabilities[:, index] * weights
        total[row:row + window, col:col + window] += weights
    return fused / total


def locate_heart(probabilities: np.ndarray, roi_size: int,
                 min_evidence: float = 0.5) -> HeartLocation:
    """Heart centre and ROI from fused probabilities ``[D, K, H, W]`` (class 0 background).

    ``min_evidence`` is the slice-summed foreground probability a pixel needs to count: 0.5
    means confident myocardium on half a slice's worth, which isolated noise does not reach.
    """
    if probabilities.ndim != 4:
        raise ValueError(f"expected probabilities [D, K, H, W], got {probabilities.shape}")
    if not min_evidence > 0:
        raise ValueError(f"min_evidence must be > 0, got {min_evidence}")
    height, width = probabilities.shape[2:]
    if not 0 < roi_size <= min(height, width):
        raise ValueError(f"roi_size must be in 1..{min(height, width)}, got {roi_size}")
    evidence = (1.0 - probabilities[:, 0]).sum(axis=0)
    components, count = ndimage.label(evidence >= min_evidence, structure=np.ones((3, 3)))
    if count == 0:
        centre = ((height - 1) / 2, (width - 1) / 2)
        return HeartLocation(centre, roi_origin_at(centre, roi_size, (height, width)), roi_size,
                             found=False, component_pixels=0, evidence=0.0)
    masses = ndimage.sum_labels(evidence, components, index=np.arange(1, count + 1))
    best = int(np.argmax(masses)) + 1
    heart = components == best
    centre_rc = ndimage.center_of_mass(np.where(heart, evidence, 0.0))
    centre = (float(centre_rc[0]), float(centre_rc[1]))
    return HeartLocation(centre, roi_origin_at(centre, roi_size, (height, width)), roi_size,
                         found=True, component_pixels=int(heart.sum()),
                         evidence=float(masses[best - 1]))


def roi_origin_at(centre: tuple[float, float], size: int,
                  shape: tuple[int, int]) -> tuple[int, int]:
    """Top-left corner of a ``size`` box centred on ``centre``, kept inside ``shape``.

    The same rounding and clamping as :func:`preprocessing.pipeline.roi_origin`, so a perfect
    detector reproduces the training crop exactly.
    """
    height, width = shape
    row0 = int(np.clip(round(centre[0] - size / 2), 0, height - size))
    col0 = int(np.clip(round(centre[1] - size / 2), 0, width - size))
    return row0, col0
