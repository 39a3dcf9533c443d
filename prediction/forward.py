"""Batched class probabilities for stacks of image windows, absent sequences included.

Localisation fuses probabilities of overlapping windows and the native mapping interpolates them,
so both need softmax outputs rather than labels: those of
:func:`evaluation.inference.predict_probabilities` (windows resized to the network's input size
and back), on windows scaled from the stored [0, 255] to the network's [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from datasets.labels import MODALITIES
from evaluation.inference import predict_probabilities

#: Processed images are stored in [0, 255]; the network reads them divided by 255
#: (datasets.processed).
INPUT_SCALE = 255.0


def window_probabilities(model: nn.Module, windows: np.ndarray, present: Sequence[str],
                         img_size: int, device: torch.device,
                         batch_size: int = 32, *, tta: bool = False) -> np.ndarray:
    """Softmax ``[N, K, h, w]`` (float32) for ``windows [N, S, h, w]`` in [0, 255].

    ``present`` names the given sequences; the others are zeroed and, for networks that take
    one, masked (:func:`networks.sequences.forward_with_sequences`). With every sequence present
    the plain forward is used, exactly as in training without sequence dropout. ``tta`` averages
    the four flips. The caller puts the model in eval mode.
    """
    if windows.ndim != 4 or windows.shape[1] != len(MODALITIES):
        raise ValueError(f"expected windows [N, {len(MODALITIES)}, h, w], got {windows.shape}")
    if img_size < 1:
        raise ValueError(f"img_size must be >= 1, got {img_size}")
    scaled = np.asarray(windows, dtype=np.float32) / np.float32(INPUT_SCALE)
    return predict_probabilities(model, scaled, img_size, device, batch_size, tta=tta,
                                 sequences=tuple(present))
