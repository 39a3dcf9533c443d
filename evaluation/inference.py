"""Whole-volume inference: every slice of a volume goes through the network in large batches."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def predict_volume(model: nn.Module, image: np.ndarray, img_size: int, device: torch.device,
                   batch_size: int = 32) -> np.ndarray:
    """Label volume ``[D, H, W]`` (uint8) for ``image [D, S, H, W]`` in [0, 1].

    Slices are resized to the network's ``img_size`` and the class probabilities resized back
    (bilinear) before the argmax, so predictions live on the stored grid whatever size it has.
    The caller puts the model in eval mode.
    """
    if image.ndim != 4:
        raise ValueError(f"expected image [D, S, H, W], got shape {image.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    depth, _, height, width = image.shape
    labels = np.empty((depth, height, width), dtype=np.uint8)
    for start in range(0, depth, batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(image[start:start + batch_size])).to(device)
        batch = batch.float()
        if (height, width) != (img_size, img_size):
            batch = F.interpolate(batch, size=(img_size, img_size), mode="bilinear",
                                  align_corners=False)
        probabilities = torch.softmax(model(batch).float(), dim=1)
        if (height, width) != (img_size, img_size):
            probabilities = F.interpolate(probabilities, size=(height, width), mode="bilinear",
                                          align_corners=False)
        labels[start:start + batch_size] = probabilities.argmax(dim=1).to(torch.uint8).cpu().numpy()
    return labels
