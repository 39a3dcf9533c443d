from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from datasets.raw import discover_cases, load_case
from preprocessing.affine_registration import (
    AffineRegistrationConfig,
    AffineResult,
    affine_to_sitk,
    implausibility,
    myocardium_metric_mask,
    register_affine,
    sitk_to_affine,
)
from preprocessing.pipeline import PreprocessConfig, preprocess_case
from preprocessing.transforms import Affine2D, warp

SIZE = 224
CENTRE = (112.0, 106.0)
#: Tissue classes of the phantom and their intensity in each contrast.
CLASSES = ("background", "lung", "tissue", "fat", "lv_blood", "rv_blood", "myocardium", "lesion")
LGE_LIKE = (60.0, 10.0, 90.0, 170.0, 150.0, 140.0, 35.0, 230.0)
T2W_LIKE = (50.0, 10.0, 70.0, 200.0, 20.0, 25.0, 110.0, 175.0)


def phantom_classes() -> tuple[np.ndarray, np.ndarray]:
    """Class map of a short-axis slice and its label (1 myocardium, 2 lesion), on the fixed grid.

    The LV ring is elliptical, thicker on one side and has an RV crescent and a lesion sector,
    so rotation, scale and shift are all identifiable from the heart alone.
    """
    rows, cols = np.indices((SIZE, SIZE), dtype=np.float64)
    dr, dc = rows - CENTRE[0], cols - CENTRE[1]
    angle = np.arctan2(dr, dc)
    radius = np.hypot(dr / 1.1, dc)
    inner = 20.0 + 2.0 * np.cos(2 * angle)
    outer = inner + 8.0 + 3.0 * np.cos(angle - 0.7)
    classes = np.full((SIZE, SIZE), CLASSES.index("tissue"))
    classes[np.hypot((rows - 100) / 70, (cols - 115) / 85) > 1] = CLASSES.index("lung")
    classes[np.hypot(dr + 5, dc - 4) < outer.max() + 12] = CLASSES.index("fat")
    classes[np.hypot(dr + 4, dc - 38) < 26] = CLASSES.index("rv_blood")
    classes[radius < outer] = CLASSES.index("myocardium")
    classes[radius < inner] = CLASSES.index("lv_blood")
    lesion = (radius >= inner) & (radius < outer) & (np.abs(np.angle(np.exp(1j * (angle - 2.2))))
                                                      < 0.5)
    classes[lesion] = CLASSES.index("lesion")
    label = np.where(classes == CLASSES.index("myocardium"), 1, 0)
    label[lesion] = 2
    return classes, label


def render(classes: np.ndarray, palette: tuple[float, ...], noise: float, seed: int) -> np.ndarray:
    image = np.asarray(palette, dtype=np.float32)[classes]
    image = ndimage.gaussian_filter(image, 1.0)
    image += np.random.default_rng(seed).normal(0, noise, image.shape).astype(np.float32)
    return np.clip(image, 0, 255)


def residual(estimate: Affine2D, truth: Affine2D, label: np.ndarray) -> float:
    """Mean distance between where the two transforms send the myocardium pixels."""
    points = np.argwhere(label > 0).astype(np.float64)
    return float(np.linalg.norm(estimate.apply(points) - truth.apply(points), axis=1).mean())


def misaligned(image: np.ndarray, truth: Affine2D) -> np.ndarray:
    """Moving slice whose content at ``truth(q)`` is the reference content at ``q``."""
    return warp(image, truth.inverse().field(image.shape), is_label=False)


@pytest.fixture(scope="module")
def phantom():
    classes, label = phantom_classes()
    fixed = render(classes, LGE_LIKE, noise=6.0, seed=1)
    moving = render(classes, T2W_LIKE, noise=4.0, seed=2)
    return fixed, moving, label, myocardium_metric_mask(label, 15.0)


# --- conventions -----------------------------------------------------------------------------


def test_sitk_translation_along_y_is_a_row_offset():
    transform = sitk.AffineTransform(2)
    transform.SetTranslation((0.0, 3.0))  # (x, y) in mm
    affine = sitk_to_affine(transform, pixel_spacing_mm=0.5)
    np.testing.assert_allclose(affine.matrix, np.eye(2))
    np.testing.assert_allclose(affine.offset, (6.0, 0.0))


@pytest.mark.parametrize("kind", ["affine", "similarity", "rigid"])
def test_sitk_conversion_matches_transform_point_with_centre_and_spacing(kind):
    spacing = 0.7
    transform = {"affine": lambda: sitk.AffineTransform(2),
                 "similarity": sitk.Similarity2DTransform, "rigid": sitk.Euler2DTransform}[kind]()
    transform.SetCenter((40.0, 25.0))
    transform.SetTranslation((1.5, -2.0))
    if kind == "affine":
        transform.SetMatrix((1.02, 0.05, -0.03, 0.97))
    else:
        transform.SetAngle(np.deg2rad(7.0))
    if kind == "similarity":
        transform.SetScale(1.04)
    affine = sitk_to_affine(transform, spacing)
    points_rc = np.random.default_rng(0).uniform(0, 100, (20, 2))
    expected = np.array([transform.TransformPoint(tuple(p[::-1] * spacing)) for p in points_rc])
    np.testing.assert_allclose(affine.apply(points_rc), expected[:, ::-1] / spacing, atol=1e-9)
    np.testing.assert_allclose(sitk_to_affine(affine_to_sitk(affine, spacing), spacing).matrix,
                               affine.matrix, atol=1e-12)
    np.testing.assert_allclose(sitk_to_affine(affine_to_sitk(affine, spacing), spacing).offset,
                               affine.offset, atol=1e-9)


def test_sitk_resampling_and_warp_agree(phantom):
    """Our pull convention is the one SimpleITK resamples with (fixed point -> moving point)."""
    _, moving, _, _ = phantom
    truth = Affine2D.from_parameters(6.0, 1.03, (2.5, -1.5), CENTRE)
    ours = warp(moving, truth.field(moving.shape), is_label=False)
    image = sitk.GetImageFromArray(moving)
    theirs = sitk.GetArrayFromImage(
        sitk.Resample(image, image, affine_to_sitk(truth), sitk.sitkLinear, 0.0))
    np.testing.assert_allclose(ours[20:-20, 20:-20], theirs[20:-20, 20:-20], atol=1e-3)


def test_pure_row_shift_is_recovered_as_row_offset(phantom):
    fixed, moving, _, mask = phantom
    truth = Affine2D(np.eye(2), np.array([3.0, 0.0]))
    result = register_affine(fixed, misaligned(moving, truth), mask)
    centre = np.array(CENTRE)
    np.testing.assert_allclose(result.transform.apply(centre) - centre, (3.0, 0.0), atol=0.25)
    np.testing.assert_allclose(result.transform.matrix, np.eye(2), atol=0.01)
    assert result.model == "affine" and result.metric_after < result.metric_before


# --- recovery --------------------------------------------------------------------------------


def random_truth(rng: np.random.Generator) -> Affine2D:
    """A breath-hold-like misalignment: <= 5 deg, <= 4 px, +-4 % scale, about the heart."""
    shift = rng.uniform(-4, 4, 2) / np.sqrt(2)
    return Affine2D.from_parameters(rng.uniform(-5, 5), rng.uniform(0.96, 1.04), tuple(shift),
                                    CENTRE)


def test_known_affines_are_recovered_across_contrasts(phantom):
    fixed, moving, label, mask = phantom
    rng = np.random.default_rng(7)
    for _ in range(4):
        truth = random_truth(rng)
        result = register_affine(fixed, misaligned(moving, truth), mask)
        assert result.model == "affine", result.fallbacks
        assert residual(result.transform, truth, label) < 0.5
        assert residual(Affine2D.identity(), truth, label) > 1.0  # the test could fail


@pytest.mark.parametrize("model", ["similarity", "rigid"])
def test_restricted_models_recover_their_own_motion(phantom, model):
    fixed, moving, label, mask = phantom
    scale = 1.03 if model == "similarity" else 1.0
    truth = Affine2D.from_parameters(-4.0, scale, (2.0, -2.5), CENTRE)
    result = register_affine(fixed, misaligned(moving, truth), mask,
                             AffineRegistrationConfig(model=model))
    assert result.model == model
    assert residual(result.transform, truth, label) < 0.5


def test_registration_is_deterministic(phantom):
    fixed, moving, _, mask = phantom
    moving = misaligned(moving, Affine2D.from_parameters(3.0, 1.02, (1.0, 2.0), CENTRE))
    first = register_affine(fixed, moving, mask)
    second = register_affine(fixed, moving, mask)
    np.testing.assert_array_equal(first.transform.matrix, second.transform.matrix)
    np.testing.assert_array_equal(first.transform.offset, second.transform.offset)


# --- real MyoPS 2020 slices ------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_fits(myops2020_dir):
    """Slices 0-2 of the first case: bSSFP and T2w moved by 4 deg, 3 px, 3 %, fitted onto LGE."""
    processed = preprocess_case(load_case(discover_cases(myops2020_dir)[0]),
                                PreprocessConfig(roi_size=224))
    config = AffineRegistrationConfig()
    fits = []
    for index in range(3):
        label = processed.label[index]
        centre = np.argwhere(label > 0).mean(axis=0)
        truth = Affine2D.from_parameters(4.0, 1.03, (3.0 / np.sqrt(2), -3.0 / np.sqrt(2)),
                                         tuple(centre))
        mask = myocardium_metric_mask(label, config.mask_margin_mm)
        for name in ("bSSFP", "T2w"):
            moved = misaligned(processed.images[name][index], truth)
            result = register_affine(processed.images["LGE"][index], moved, mask, config)
            fits.append((name, truth, label, centre, result))
    return config, fits


def test_real_slices_give_plausible_fits_never_worse_than_identity(real_fits):
    config, fits = real_fits
    for _name, _truth, _label, centre, result in fits:
        assert implausibility(result.transform, centre, config) is None
        assert result.metric_after <= result.metric_before
        assert (result.model == "identity") == (len(result.fallbacks) == 3)
        json.dumps(result.to_dict())


@pytest.mark.xfail(strict=True, reason=(
    "known gap: after this motion Case3001 slices 0-2 come back 0.8-3.3 px off (bSSFP) and "
    "2.9-8.9 px (T2w, mostly identity fallbacks); LGE->LGE recovers to 0.01 px, so the limit "
    "is the cross-contrast MI landscape of real slices, not the conventions. Over all 117 "
    "slices with milder random motion: bench/bench_affine_registration.py"))
def test_real_known_affine_is_recovered_within_1px(real_fits):
    _, fits = real_fits
    for sequence in ("bSSFP", "T2w"):
        errors = [residual(result.transform, truth, label)
                  for name, truth, label, _, result in fits if name == sequence]
        assert np.mean(errors) < 1.0, (sequence, errors)


# --- fallbacks -------------------------------------------------------------------------------


def test_constant_moving_image_gives_identity(phantom):
    fixed, _, _, mask = phantom
    result = register_affine(fixed, np.zeros_like(fixed), mask)
    assert result.model == "identity"
    np.testing.assert_array_equal(result.transform.matrix, np.eye(2))
    np.testing.assert_array_equal(result.transform.offset, np.zeros(2))
    assert any("constant" in reason for reason in result.fallbacks)
    json.dumps(result.to_dict())  # NaN metrics become null


def test_noise_moving_image_gives_a_plausible_transform(phantom):
    fixed, _, _, mask = phantom
    noise = np.random.default_rng(3).uniform(0, 255, fixed.shape).astype(np.float32)
    config = AffineRegistrationConfig()
    result = register_affine(fixed, noise, mask, config)
    centre = np.argwhere(mask).mean(axis=0)
    assert implausibility(result.transform, centre, config) is None
    assert result.metric_after <= result.metric_before


def test_implausible_fits_fall_back_model_by_model(phantom):
    fixed, moving, _, mask = phantom
    truth = Affine2D.from_parameters(0.0, 1.08, (0.0, 0.0), CENTRE)
    config = AffineRegistrationConfig(scale_bounds=(0.97, 1.03))
    result = register_affine(fixed, misaligned(moving, truth), mask, config)
    assert result.model == "rigid"
    assert [reason.split(":")[0] for reason in result.fallbacks] == ["affine", "similarity"]
    assert all("scales" in reason for reason in result.fallbacks)

    shifted = Affine2D(np.eye(2), np.array([0.0, 8.0]))
    config = AffineRegistrationConfig(max_translation_mm=4.0)
    result = register_affine(fixed, misaligned(moving, shifted), mask, config)
    assert result.model == "identity" and len(result.fallbacks) == 3
    assert result.metric_after == result.metric_before
    record = result.to_dict()
    assert record["model"] == "identity" and record["requested_model"] == "affine"
    assert json.loads(json.dumps(record)) == record


def test_empty_mask_gives_identity(phantom):
    fixed, moving, _, _ = phantom
    result = register_affine(fixed, moving, np.zeros(fixed.shape, dtype=bool))
    assert result.model == "identity" and "mask" in result.fallbacks[0]


# --- masks and validation --------------------------------------------------------------------


def test_metric_mask_fills_the_cavity_and_dilates_in_mm():
    label = np.zeros((64, 64), dtype=np.int64)
    rows, cols = np.indices(label.shape)
    radius = np.hypot(rows - 32, cols - 32)
    label[(radius >= 8) & (radius < 12)] = 1
    label[(radius >= 8) & (radius < 12) & (cols > 38)] = 3
    mask = myocardium_metric_mask(label, margin_mm=5.0)
    assert mask[32, 32]  # cavity
    assert mask[32, 32 + 16] and not mask[32, 32 + 18]
    half = myocardium_metric_mask(label, margin_mm=5.0, pixel_spacing_mm=0.5)
    assert half[32, 32 + 21] and not half[32, 32 + 23]
    assert not myocardium_metric_mask(np.zeros((8, 8)), 5.0).any()
    with pytest.raises(ValueError, match="2D"):
        myocardium_metric_mask(np.zeros((2, 8, 8)), 5.0)
    with pytest.raises(ValueError, match="margin"):
        myocardium_metric_mask(label, -1.0)


@pytest.mark.parametrize("kwargs, match", [
    ({"model": "bspline"}, "model"),
    ({"mask_margin_mm": -1.0}, "mask_margin"),
    ({"histogram_bins": 2}, "histogram_bins"),
    ({"shrink_factors": (4, 2), "smoothing_sigmas_mm": (1.0,)}, "same"),
    ({"shrink_factors": (0,), "smoothing_sigmas_mm": (0.0,)}, "shrink"),
    ({"smoothing_sigmas_mm": (1.0, -1.0, 0.0)}, "smoothing"),
    ({"iterations": 0}, "iterations"),
    ({"learning_rate": 1e-4}, "min_step"),
    ({"relaxation": 1.0}, "relaxation"),
    ({"sampling_fraction": 0.0}, "sampling"),
    ({"num_threads": 0}, "num_threads"),
    ({"max_rotation_deg": 0.0}, "rotation"),
    ({"max_translation_mm": 0.0}, "translation"),
    ({"scale_bounds": (1.05, 1.1)}, "scale_bounds"),
    ({"pixel_spacing_mm": 0.0}, "pixel_spacing"),
])
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AffineRegistrationConfig(**kwargs)


def test_bad_inputs_raise(phantom):
    fixed, moving, _, mask = phantom
    with pytest.raises(ValueError, match="one grid"):
        register_affine(fixed[None], moving[None], mask[None])
    with pytest.raises(ValueError, match="one grid"):
        register_affine(fixed, moving[:-1], mask)
    with pytest.raises(ValueError, match="boolean"):
        register_affine(fixed, moving, mask.astype(np.uint8))
    bad = moving.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        register_affine(fixed, bad, mask)


def test_config_and_result_serialise():
    config = AffineRegistrationConfig(model="rigid")
    assert json.loads(json.dumps(config.to_dict()))["model"] == "rigid"
    result = AffineResult(Affine2D.identity(), "identity", -0.5, -0.5, 0.01)
    assert json.loads(json.dumps(result.to_dict()))["transform"]["matrix"] == [[1, 0], [0, 1]]
