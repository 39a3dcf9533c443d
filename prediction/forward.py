"""Batched class probabilities for stacks of image windows, absent sequences included.

Localisation fuses probabilities of overlapping windows and the native mapping interpolates them,
so both need softmax outputs rather than labels. Windows are resized to the network's input size
and the probabilities resized back (bilinear, as :func:`evaluation.inference.predict_volume`),
so a network trained at ``img_size`` 224 on 128 mm ROIs sees them as it did in training.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from datasets.labels import MODALITIES
from networks.sequences import forward_with_sequences, presence_vector

#: Processed images are stored in [0, 255]; the network reads them divided by 255
#: (datasets.processed).
INPUT_SCALE = 255.0


@torch.no_grad()
def window_probabilities(model: nn.Module, windows: np.ndarray, present: Sequence[str],
                         img_size: int, device: torch.device,
                         batch_size: int = 32) -> np.ndarray:
    """Softmax ``[N, K, h, w]`` (float32) for ``windows [N, S, h, w]`` in [0, 255].

    ``present`` names the given sequences; the others are zeroed and, for networks that take
    one, masked (:func:`networks.sequences.forward_with_sequences`). With every sequence present
    the plain forward is used, exactly as in training without sequence dropout. The caller puts
    the model in eval mode.
    """
    if windows.ndim != 4 or windows.shape[1] != len(MODALITIES):
        raise ValueError(f"expected windows [N, {len(MODALITIES)}, h, w], got {windows.shape}")
    if img_size < 1 or batch_size < 1:
        raise ValueError(f"img_size and batch_size must be >= 1, got {img_size}, {batch_size}")
    presence = presence_vector(present)
    all_present = bool(presence.all())
    height, width = windows.shape[-2:]
    resize = (height, width) != (img_size, img_size)
    outputs: list[np.ndarray] = []
    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size]
        batch = torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32)).to(device)
        batch = batch / INPUT_SCALE
        if resize:
            batch = F.interpolate(batch, size=(img_size, img_size), mode="bilinear",
                                  align_corners=False)
        mask = None if all_present else presence.to(device).expand(len(batch), -1)
        probabilities = torch.softmax(forward_with_sequences(model, batch, mask).float(), dim=1)
        if resize:
            probabilities = F.interpolate(probabilities, size=(height, width), mode="bilinear",
                                          align_corners=False)
        outputs.append(probabilities.cpu().numpy())
    return np.concatenate(outputs).astype(np.float32, copy=False)
