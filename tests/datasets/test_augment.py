from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from datasets.augment import AugmentConfig, augment


def _sample(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Label with an off-centre block; every sequence encodes the label in its intensities."""
    label = np.zeros((size, size), np.uint8)
    label[4:12, 6:20] = 1
    label[14:18, 20:28] = 3
    image = np.stack([label / 3.0, (3 - label) / 3.0, np.where(label == 3, 1.0, 0.2)])
    return image.astype(np.float32), label


def _spatial_only(**changes) -> AugmentConfig:
    return dataclasses.replace(AugmentConfig.off(), **changes)


def _decode(image: np.ndarray) -> np.ndarray:
    return np.rint(image[0] * 3).astype(np.uint8)


def test_off_is_identity():
    image, label = _sample()
    out_image, out_label = augment(image, label, AugmentConfig.off(), np.random.default_rng(0))
    np.testing.assert_array_equal(out_image, image)
    np.testing.assert_array_equal(out_label, label)


@pytest.mark.parametrize("seed", range(6))
def test_rot90_flip_moves_all_sequences_and_label_together(seed):
    image, label = _sample()
    config = _spatial_only(p_rot90_flip=1.0)
    out_image, out_label = augment(image, label, config, np.random.default_rng(seed))
    np.testing.assert_array_equal(_decode(out_image), out_label)
    np.testing.assert_allclose(out_image[1], (3 - out_label) / 3.0, atol=1e-6)
    assert sorted(np.bincount(out_label.ravel())) == sorted(np.bincount(label.ravel()))


@pytest.mark.parametrize("seed", range(6))
def test_free_affine_keeps_label_and_image_registered(seed):
    image, label = _sample(48)
    config = _spatial_only(p_affine=1.0, max_rotation_deg=30.0)
    out_image, out_label = augment(image, label, config, np.random.default_rng(seed))
    # Linear and nearest interpolation agree everywhere except on a thin boundary band.
    agree = _decode(out_image) == out_label
    assert agree.mean() > 0.97
    assert out_label.dtype == np.uint8 and set(np.unique(out_label)) <= {0, 1, 3}


def test_intensity_transforms_stay_in_unit_range_and_keep_geometry():
    image, label = _sample()
    config = dataclasses.replace(AugmentConfig.off(), p_brightness=1.0, p_gamma=1.0, p_noise=1.0,
                                 brightness_range=(1.5, 1.5))
    out_image, out_label = augment(image, label, config, np.random.default_rng(3))
    assert out_image.min() >= 0.0 and out_image.max() <= 1.0
    np.testing.assert_array_equal(out_label, label)
    assert not np.allclose(out_image, image)


def test_same_generator_state_gives_same_result_and_input_untouched():
    image, label = _sample()
    before = image.copy()
    first = augment(image, label, AugmentConfig(), np.random.default_rng(11))
    second = augment(image, label, AugmentConfig(), np.random.default_rng(11))
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(image, before)


@pytest.mark.parametrize("change", [{"p_noise": 1.5}, {"gamma_range": (0.0, 1.0)},
                                    {"scale_range": (1.2, 1.1)}, {"noise_std": -0.1}])
def test_bad_config_raises(change):
    with pytest.raises(ValueError):
        AugmentConfig(**change)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="expected"):
        augment(np.zeros((3, 8, 8), np.float32), np.zeros((4, 4), np.uint8), AugmentConfig(),
                np.random.default_rng(0))
