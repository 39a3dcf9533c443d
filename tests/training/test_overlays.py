"""TensorBoard overlay grid: layout, colours and input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datasets.labels import BACKGROUND, EDEMA, MODALITIES, NORMAL_MYOCARDIUM, SCAR
from training.overlays import CLASS_COLOURS, PAD, TILES_PER_ROW, blend, overlay_grid

H, W = 10, 12
LGE = MODALITIES.index("LGE")


def _inputs(n: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (n, 3, H, W)).astype(np.float32)
    labels = np.zeros((n, H, W), np.uint8)
    predictions = np.zeros((n, H, W), np.int64)
    return images, labels, predictions


def _tile(grid: np.ndarray, row: int, column: int) -> np.ndarray:
    top, left = row * (H + PAD), column * (W + PAD)
    return grid[:, top:top + H, left:left + W]


def test_colours_are_distinct_and_background_is_transparent():
    assert BACKGROUND not in CLASS_COLOURS
    assert set(CLASS_COLOURS) == {NORMAL_MYOCARDIUM, SCAR, EDEMA}
    assert len(set(CLASS_COLOURS.values())) == 3


@pytest.mark.parametrize(("n", "max_items", "rows"), [(3, 4, 3), (6, 4, 4), (1, 1, 1), (5, 2, 2)])
def test_grid_shape_and_dtype(n, max_items, rows):
    grid = overlay_grid(*_inputs(n), max_items=max_items)
    assert grid.dtype == np.uint8
    assert grid.shape == (3, rows * H + (rows - 1) * PAD,
                          TILES_PER_ROW * W + (TILES_PER_ROW - 1) * PAD)


def test_tiles_hold_the_sequences_and_blended_labels():
    images, labels, predictions = _inputs(2)
    images[1, LGE] = 0.4
    labels[1, 2, 3] = SCAR
    predictions[1, 5, 6] = EDEMA
    grid = overlay_grid(images, labels, predictions)
    gt_tile, pred_tile = _tile(grid, 1, 0), _tile(grid, 1, 1)
    expected_scar = np.round((0.5 * 0.4 + 0.5 * np.array(CLASS_COLOURS[SCAR]) / 255) * 255)
    np.testing.assert_array_equal(gt_tile[:, 2, 3], expected_scar)
    expected_edema = np.round((0.5 * 0.4 + 0.5 * np.array(CLASS_COLOURS[EDEMA]) / 255) * 255)
    np.testing.assert_array_equal(pred_tile[:, 5, 6], expected_edema)
    # Background stays the plain grey LGE value in every channel.
    grey = round(0.4 * 255)
    assert (gt_tile[:, 0, 0] == grey).all() and (pred_tile[:, 2, 3] == grey).all()
    # The last two tiles are the plain bSSFP and T2w slices.
    for column, modality in ((2, "bSSFP"), (3, "T2w")):
        plain = np.round(images[0, MODALITIES.index(modality)] * 255).astype(np.uint8)
        for channel in range(3):
            np.testing.assert_array_equal(_tile(grid, 0, column)[channel], plain)
    # Separators are white.
    assert (grid[:, H:H + PAD, :] == 255).all()


def test_scar_is_reddish_and_edema_bluish_on_a_grey_image():
    grey = np.full((4, 4), 0.5, np.float32)
    labels = np.array([[SCAR, EDEMA, NORMAL_MYOCARDIUM, BACKGROUND]] * 4)
    rgb = blend(grey, labels)
    assert rgb[0, 0, 0] > rgb[1, 0, 0] and rgb[0, 0, 0] > rgb[2, 0, 0]  # scar: red dominates
    assert rgb[2, 0, 1] > rgb[0, 0, 1]  # edema: blue over red
    assert rgb[1, 0, 2] > rgb[0, 0, 2] and rgb[1, 0, 2] > rgb[2, 0, 2]  # myocardium: green
    np.testing.assert_array_equal(rgb[:, :, 3], 0.5)


def test_accepts_cpu_tensors():
    images, labels, predictions = _inputs(2)
    grid = overlay_grid(torch.from_numpy(images), torch.from_numpy(labels),
                        torch.from_numpy(predictions))
    np.testing.assert_array_equal(grid, overlay_grid(images, labels, predictions))


def _bad_cases():
    images, labels, predictions = _inputs(2)
    yield "images must be", (images[0], labels, predictions), {}
    yield "images must be", (images[:, :2], labels, predictions), {}
    yield "images must be", (images[:0], labels[:0], predictions[:0]), {}
    yield "in \\[0, 1\\]", (images * 255, labels, predictions), {}
    yield "in \\[0, 1\\]", (np.where(images > 0.5, np.nan, images), labels, predictions), {}
    yield "floating point", ((images * 255).astype(np.uint8), labels, predictions), {}
    yield "labels must have shape", (images, labels[:1], predictions), {}
    yield "predictions must have shape", (images, labels, predictions[:, :5]), {}
    yield "labels values", (images, labels + 4, predictions), {}
    yield "predictions values", (images, labels, predictions - 1), {}
    yield "integer class labels", (images, labels.astype(np.float32), predictions), {}
    yield "max_items", (images, labels, predictions), {"max_items": 0}
    yield "alpha", (images, labels, predictions), {"alpha": 1.5}


@pytest.mark.parametrize(("message", "args", "kwargs"), list(_bad_cases()))
def test_bad_inputs_raise(message, args, kwargs):
    with pytest.raises(ValueError, match=message):
        overlay_grid(*args, **kwargs)
