"""A stand-in network that knows the answer, for testing geometry without training.

:class:`LookupModel` is given the crop-grid images the pipeline will cut windows from and the
ground truth on the same grid. It finds each input window on that grid by its pixels (windows are
exact crops when the model's input size equals the window size) and returns the truth there as
confident one-hot logits. Whatever the pipeline then gets wrong (heart centre, ROI, native
mapping) is geometry, not segmentation.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from datasets.labels import NUM_CLASSES


class LookupModel(nn.Module):
    """``images [D, S, H, W]`` in [0, 255] and ``labels [D, H, W]`` on the same crop grid.

    ``key`` is the channel windows are located by (the reference sequence, which registration
    never changes). Every located window is appended to ``seen`` as ``(slice, row, col, size)``.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, key: int) -> None:
        super().__init__()
        self.images = (torch.from_numpy(images).float() / 255.0).numpy()[:, key]
        self.labels = labels
        self.key = key
        self.seen: list[tuple[int, int, int, int]] = []
        self.inputs: list[np.ndarray] = []

    def locate(self, window: np.ndarray) -> tuple[int, int, int]:
        """``(slice, row, col)`` of the crop equal to ``window``: candidates share its centre
        pixel, then the whole window must match."""
        size = window.shape[-1]
        half = size // 2
        _, height, width = self.images.shape
        centres = self.images[:, half:half + height - size + 1, half:half + width - size + 1]
        for depth, row, col in np.argwhere(centres == window[half, half]):
            if np.array_equal(self.images[depth, row:row + size, col:col + size], window):
                return int(depth), int(row), int(col)
        raise AssertionError("window not found on the grid")

    def forward(self, x: Tensor) -> Tensor:
        windows = x.detach().cpu().numpy()
        self.inputs.append(windows)
        logits = []
        for window in windows:
            depth, row, col = self.locate(window[self.key])
            size = window.shape[-1]
            self.seen.append((depth, row, col, size))
            truth = torch.from_numpy(self.labels[depth, row:row + size, col:col + size]).long()
            one_hot = nn.functional.one_hot(truth, NUM_CLASSES).permute(2, 0, 1).float()
            logits.append(one_hot * 20.0 - 10.0)
        return torch.stack(logits).to(x.device)
