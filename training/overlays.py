"""Label overlays for TensorBoard: what the network predicts next to the ground truth.

Dice curves say how much is wrong, not what; one image of the LGE slice with the reference and the
predicted classes painted on it shows at a glance whether scar is missed, confused with edema or
spilled outside the myocardium. Pure numpy, so it runs on any rank and in tests.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from datasets.labels import EDEMA, MODALITIES, NORMAL_MYOCARDIUM, NUM_CLASSES, SCAR

#: RGB colour painted over each foreground class; background (absent) stays transparent.
#: Green / red / blue keep the three classes apart, and red on bright LGE scar stays visible.
CLASS_COLOURS: Mapping[int, tuple[int, int, int]] = {
    NORMAL_MYOCARDIUM: (0, 200, 0),
    SCAR: (255, 30, 30),
    EDEMA: (40, 110, 255),
}
#: Tiles per row: LGE + ground truth, LGE + prediction, then the plain bSSFP and T2w slices.
TILES_PER_ROW = 4
#: Separator between tiles (pixels, drawn white so it shows on dark images).
PAD = 2
_LGE, _BSSFP, _T2W = (MODALITIES.index(name) for name in ("LGE", "bSSFP", "T2w"))


def _check_labels(values: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
    if values.shape != shape:
        raise ValueError(f"{what} must have shape {shape} (N, H, W of the images), got "
                         f"{values.shape}")
    if not (np.issubdtype(values.dtype, np.integer) or values.dtype == np.bool_):
        raise ValueError(f"{what} must hold integer class labels, got dtype {values.dtype}")
    if values.size and (values.min() < 0 or values.max() >= NUM_CLASSES):
        raise ValueError(f"{what} values must be in 0..{NUM_CLASSES - 1}, got "
                         f"{values.min()}..{values.max()}")
    return values.astype(np.int64, copy=False)


def blend(grey: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """RGB float ``[3, H, W]`` in [0, 1]: ``grey [H, W]`` with each class's colour mixed in."""
    rgb = np.repeat(grey[None].astype(np.float32), 3, axis=0)
    for label, colour in CLASS_COLOURS.items():
        mask = labels == label
        tint = np.asarray(colour, np.float32)[:, None] / 255.0
        rgb[:, mask] = (1.0 - alpha) * rgb[:, mask] + alpha * tint
    return rgb


def overlay_grid(images: np.ndarray, labels: np.ndarray, predictions: np.ndarray,
                 max_items: int = 4, alpha: float = 0.5) -> np.ndarray:
    """One row per item: LGE + ground truth, LGE + prediction, bSSFP, T2w.

    ``images [N, 3, H, W]`` in [0, 1] (channels in :data:`datasets.labels.MODALITIES` order),
    ``labels`` and ``predictions [N, H, W]`` with classes 0..3; the first ``max_items`` items are
    drawn. Returns uint8 ``[3, H_total, W_total]`` (CHW, as ``SummaryWriter.add_image`` expects),
    tiles separated by :data:`PAD` white pixels.
    """
    images = np.asarray(images)
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    if isinstance(max_items, bool) or not isinstance(max_items, int) or max_items < 1:
        raise ValueError(f"max_items must be an integer >= 1, got {max_items!r}")
    if not (0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if images.ndim != 4 or images.shape[1] != len(MODALITIES) or images.shape[0] < 1:
        raise ValueError(f"images must be [N >= 1, {len(MODALITIES)}, H, W] "
                         f"({', '.join(MODALITIES)}), got shape {images.shape}")
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images must be floating point in [0, 1], got dtype {images.dtype}")
    if not np.all(np.isfinite(images)) or images.min() < 0.0 or images.max() > 1.0:
        raise ValueError("images must be finite and in [0, 1] (got values outside)")
    count, _, height, width = images.shape
    labels = _check_labels(labels, (count, height, width), "labels")
    predictions = _check_labels(predictions, (count, height, width), "predictions")

    rows = min(count, max_items)
    grid = np.ones((3, rows * height + (rows - 1) * PAD,
                    TILES_PER_ROW * width + (TILES_PER_ROW - 1) * PAD), np.float32)
    for row in range(rows):
        lge = images[row, _LGE]
        tiles = (blend(lge, labels[row], alpha), blend(lge, predictions[row], alpha),
                 np.repeat(images[row, _BSSFP][None], 3, axis=0),
                 np.repeat(images[row, _T2W][None], 3, axis=0))
        top = row * (height + PAD)
        for column, tile in enumerate(tiles):
            left = column * (width + PAD)
            grid[:, top:top + height, left:left + width] = tile
    return np.round(grid * 255.0).astype(np.uint8)
