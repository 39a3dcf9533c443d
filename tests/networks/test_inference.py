"""Whole-volume inference: batching, flip TTA and absent sequences against references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from datasets.labels import MODALITIES
from networks.inference import (
    predict_probabilities,
    predict_probabilities_slicewise,
    predict_volume,
    predict_volume_slicewise,
)
from networks.variants import create_network
from tests.helpers import random_bank

CPU = torch.device("cpu")


def _tiny(variant: str, img_size: int = 32) -> nn.Module:
    torch.manual_seed(0)
    priors = random_bank() if variant == "immseg" else None
    return create_network(variant, backbone="tiny", img_size=img_size, priors=priors).eval()


def _image(depth: int = 5, height: int = 40, width: int = 36, seed: int = 0) -> np.ndarray:
    """A [D, S, H, W] volume in [0, 1] whose size differs from the network's (resize path)."""
    return np.random.default_rng(seed).random((depth, len(MODALITIES), height, width),
                                              dtype=np.float32)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("variant", ["transunet", "immseg"])
@pytest.mark.parametrize("tta", [False, True])
def test_batched_equals_slice_by_slice(variant, tta):
    model, image = _tiny(variant), _image()
    reference = predict_probabilities_slicewise(model, image, 32, CPU, tta=tta)
    # batch_size 3 leaves a short last batch (5 slices; with TTA 1 slice x 4 flips per pass).
    for batch_size in (3, 32):
        batched = predict_probabilities(model, image, 32, CPU, batch_size, tta=tta)
        assert batched.shape == (5, 4, 40, 36) and batched.dtype == np.float32
        np.testing.assert_allclose(batched, reference, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(
            predict_volume(model, image, 32, CPU, batch_size, tta=tta),
            predict_volume_slicewise(model, image, 32, CPU, tta=tta))
    np.testing.assert_allclose(reference.sum(axis=1), 1.0, atol=1e-5)


def test_predict_volume_is_the_argmax_and_keeps_its_positional_signature():
    model, image = _tiny("transunet"), _image(depth=3)
    labels = predict_volume(model, image, 32, CPU, 2)  # the positional call others make
    assert labels.dtype == np.uint8 and labels.shape == (3, 40, 36)
    probabilities = predict_probabilities(model, image, 32, CPU, 2)
    np.testing.assert_array_equal(labels, probabilities.argmax(axis=1))


class _SymmetricConv(nn.Module):
    """A 3x3 conv whose kernels are symmetric under both flips: flip-equivariant by construction."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(len(MODALITIES), 4, 3, padding=1)
        with torch.no_grad():
            w = self.conv.weight
            w.copy_((w + w.flip(-1) + w.flip(-2) + w.flip(-2, -1)) / 4)

    def forward(self, x: Tensor) -> Tensor:
        return 3.0 * self.conv(x)


def test_tta_leaves_a_flip_equivariant_model_unchanged():
    model, image = _SymmetricConv().eval(), _image(depth=3, height=24, width=24)
    plain = predict_probabilities(model, image, 32, CPU)
    averaged = predict_probabilities(model, image, 32, CPU, tta=True)
    np.testing.assert_allclose(averaged, plain, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(predict_volume(model, image, 32, CPU, tta=True),
                                  predict_volume(model, image, 32, CPU))


class _Ramp(nn.Module):
    """Logits = image sum x ``scale`` + a fixed position ramp per class: orientation-dependent."""

    def __init__(self, scale: np.ndarray, ramp: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("scale", torch.from_numpy(scale)[None, :, None, None])
        self.register_buffer("ramp", torch.from_numpy(ramp)[None])

    def forward(self, x: Tensor) -> Tensor:
        return x.sum(dim=1, keepdim=True) * self.scale + self.ramp


def test_tta_averages_the_four_flipped_back_probabilities():
    size = 8
    rows, cols = np.mgrid[:size, :size].astype(np.float32)
    ramp = np.stack([np.zeros_like(rows), 0.5 * cols, 0.4 * rows, 0.3 * (rows - cols)])
    scale = np.array([0.0, 1.0, -1.0, 2.0], np.float32)
    model = _Ramp(scale, ramp).eval()
    image = _image(depth=2, height=size, width=size)  # the network's size: no resizing

    # By hand: the network sees flip(x) and its output is flipped back, so the image term stays
    # in place while the ramp ends up flipped.
    summed = image.sum(axis=1, keepdims=True) * scale[None, :, None, None]
    flips = [ramp, ramp[:, :, ::-1], ramp[:, ::-1, :], ramp[:, ::-1, ::-1]]
    by_hand = [_softmax(summed + flipped[None]) for flipped in flips]
    expected = np.mean(by_hand, axis=0)

    averaged = predict_probabilities(model, image, size, CPU, tta=True)
    np.testing.assert_allclose(averaged, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(predict_probabilities(model, image, size, CPU), by_hand[0],
                               rtol=0, atol=1e-6)
    assert np.abs(expected - by_hand[0]).max() > 0.05  # the averaging is visible
    np.testing.assert_allclose(
        predict_probabilities_slicewise(model, image, size, CPU, tta=True), expected,
        rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", ["transunet", "immseg"])
def test_absent_sequence_is_zeroed_whatever_its_channel_holds(variant):
    model, image = _tiny(variant), _image(depth=3)
    garbage = image.copy()
    garbage[:, MODALITIES.index("LGE")] = np.random.default_rng(5).normal(3, 2, image[:, 0].shape)
    present = ("bSSFP", "T2w")
    without = predict_probabilities(model, image, 32, CPU, sequences=present)
    np.testing.assert_array_equal(
        predict_probabilities(model, garbage, 32, CPU, sequences=present), without)
    np.testing.assert_array_equal(
        predict_probabilities_slicewise(model, garbage, 32, CPU, sequences=present),
        predict_probabilities_slicewise(model, image, 32, CPU, sequences=present))
    # With every sequence present the channel is read (so the check above can fail).
    assert not np.allclose(predict_probabilities(model, garbage, 32, CPU), without, atol=1e-4)
    # Naming all three is the plain forward.
    np.testing.assert_array_equal(
        predict_probabilities(model, image, 32, CPU, sequences=list(reversed(MODALITIES))),
        predict_probabilities(model, image, 32, CPU))


def test_immseg_receives_the_sequence_mask():
    model, image = _tiny("immseg"), _image(depth=2, height=32, width=32)
    zeroed = torch.from_numpy(image).clone()
    zeroed[:, 1] = 0
    mask = torch.tensor([[True, False, True]] * 2)
    with torch.no_grad():
        masked = torch.softmax(model(zeroed, sequence_mask=mask), dim=1).numpy()
        unmasked = torch.softmax(model(zeroed), dim=1).numpy()
    result = predict_probabilities(model, image, 32, CPU, sequences=("bssfp", "T2w"))
    np.testing.assert_allclose(result, masked, rtol=0, atol=1e-6)
    assert np.abs(masked - unmasked).max() > 1e-4


def test_early_fusion_sees_the_zeroed_channel():
    model, image = _tiny("transunet"), _image(depth=2, height=32, width=32)
    zeroed = torch.from_numpy(image).clone()
    zeroed[:, [0, 2]] = 0
    with torch.no_grad():
        expected = torch.softmax(model(zeroed), dim=1).numpy()
    np.testing.assert_allclose(predict_probabilities(model, image, 32, CPU, sequences=["lge"]),
                               expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    ({"sequences": ["T1"]}, "unknown sequence"),
    ({"sequences": []}, "at least one sequence"),
    ({"sequences": ["LGE", "lge"]}, "named twice"),
    ({"batch_size": 0}, "batch_size"),
])
def test_bad_arguments_raise(kwargs, message):
    model, image = _SymmetricConv().eval(), _image(depth=1, height=8, width=8)
    with pytest.raises(ValueError, match=message):
        predict_volume(model, image, 8, CPU, **kwargs)


def test_bad_images_raise():
    model = _SymmetricConv().eval()
    with pytest.raises(ValueError, match=r"\[D, S, H, W\]"):
        predict_volume(model, np.zeros((3, 8, 8), np.float32), 8, CPU)
    with pytest.raises(ValueError, match="D >= 1"):
        predict_volume_slicewise(model, np.zeros((0, 3, 8, 8), np.float32), 8, CPU)
