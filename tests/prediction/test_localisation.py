from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from prediction.localisation import (
    locate_heart,
    roi_origin_at,
    sliding_probabilities,
    window_origins,
    window_weights,
)
from preprocessing.pipeline import roi_origin


def test_window_origins_known_values():
    assert window_origins(224, 128, 48) == [0, 48, 96]
    assert window_origins(224, 128, 64) == [0, 64, 96]  # the last window is flush with the edge
    assert window_origins(128, 128, 48) == [0]
    assert window_origins(10, 4, 3) == [0, 3, 6]
    for args in ((100, 128, 48), (224, 0, 48), (224, 128, 0)):
        with pytest.raises(ValueError):
            window_origins(*args)


def test_window_weights():
    gaussian = window_weights(128)
    assert gaussian.shape == (128, 128) and gaussian.dtype == np.float32
    assert gaussian.max() == pytest.approx(1.0, abs=1e-3)
    assert gaussian[63, 63] == gaussian[64, 64] == gaussian.max()
    np.testing.assert_array_equal(gaussian, gaussian.T)
    np.testing.assert_array_equal(gaussian, gaussian[::-1, ::-1])
    # sigma = 128 / 8 = 16 px around 63.5: pixel 47 is 16.5 px out, pixel 63 0.5 px.
    expected = np.exp(-(16.5**2 - 0.5**2) / (2 * 16.0**2))
    assert gaussian[63, 47] / gaussian[63, 63] == pytest.approx(expected, rel=1e-5)
    assert gaussian.min() == pytest.approx(1e-3)
    assert (window_weights(5, "uniform") == 1).all()
    with pytest.raises(ValueError, match="weighting"):
        window_weights(8, "median")


class Pixelwise(nn.Module):
    """A 1x1 convolution: every pixel's output depends on that pixel only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        torch.manual_seed(0)
        nn.init.normal_(self.conv.weight, std=3.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@pytest.mark.parametrize("weighting", ["gaussian", "uniform"])
def test_sliding_windows_fuse_to_the_whole_grid_result(weighting):
    """For a pixelwise network every window agrees, so any weighted average is exact."""
    model = Pixelwise().eval()
    images = np.random.default_rng(0).uniform(0, 255, (2, 3, 40, 40)).astype(np.float32)
    fused = sliding_probabilities(model, images, ("bSSFP", "LGE", "T2w"), 16, 7, 16,
                                  torch.device("cpu"), weighting=weighting, batch_size=5)
    with torch.no_grad():
        whole = torch.softmax(model(torch.from_numpy(images) / 255.0), dim=1).numpy()
    assert fused.shape == (2, 4, 40, 40)
    np.testing.assert_allclose(fused, whole, atol=1e-5)


def ring_probabilities(centres, shape=(3, 224, 224), radius=(18.0, 26.0), p=0.95):
    """Background/myocardium probabilities with a ring around ``centres[i]`` on slice ``i``."""
    depth, height, width = shape
    rows, cols = np.mgrid[:height, :width]
    probabilities = np.zeros((depth, 4, height, width), np.float32)
    labels = np.zeros(shape, np.uint8)
    for i, (row, col) in enumerate(centres):
        distance = np.hypot(rows - row, cols - col)
        labels[i] = (distance >= radius[0]) & (distance <= radius[1])
    probabilities[:, 1] = np.where(labels > 0, p, 1 - p)
    probabilities[:, 0] = 1 - probabilities[:, 1]
    return probabilities, labels


def test_heart_is_the_largest_mass_not_the_brightest_spot():
    probabilities, labels = ring_probabilities([(140.0, 70.0), (142.0, 72.0), (141.0, 71.0)])
    # A small, very confident false positive on every slice elsewhere.
    probabilities[:, 1, 20:28, 190:198] = 1.0
    probabilities[:, 0, 20:28, 190:198] = 0.0
    location = locate_heart(probabilities, 128)
    assert location.found
    assert location.centre == pytest.approx((141.0, 71.0), abs=0.3)
    assert location.origin == roi_origin(labels, 128, "case")
    assert location.component_pixels == pytest.approx(
        np.count_nonzero(labels.any(axis=0)), rel=0.2)


def test_roi_is_clamped_to_the_grid():
    probabilities, labels = ring_probabilities([(40.0, 200.0)] * 3)
    location = locate_heart(probabilities, 128)
    assert location.origin == (0, 96) == roi_origin(labels, 128, "case")


def test_no_myocardium_falls_back_to_the_grid_centre():
    probabilities = np.zeros((3, 4, 224, 224), np.float32)
    probabilities[:, 0] = 0.9
    probabilities[:, 1] = 0.1  # 0.3 summed over 3 slices: below the 0.5 threshold
    location = locate_heart(probabilities, 128)
    assert not location.found
    assert location.centre == (111.5, 111.5) and location.origin == (48, 48)
    with pytest.raises(ValueError):
        locate_heart(probabilities, 300)
    with pytest.raises(ValueError):
        locate_heart(probabilities, 128, min_evidence=0.0)


def test_roi_origin_matches_preprocessing():
    rng = np.random.default_rng(3)
    for _ in range(20):
        label = (rng.random((2, 60, 60)) > 0.97).astype(np.uint8)
        label[0, rng.integers(0, 60), rng.integers(0, 60)] = 1
        _, rows, cols = np.nonzero(label)
        assert roi_origin_at((rows.mean(), cols.mean()), 32, (60, 60)) == roi_origin(
            label, 32, "case")
