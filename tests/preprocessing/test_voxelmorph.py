"""VoxelMorph step: sampler conventions, known loss values, learning, checkpoints, bad input."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from preprocessing import voxelmorph_losses
from preprocessing.transforms import compose_fields, identity_field, warp
from preprocessing.voxelmorph import (
    checkpoint_provenance,
    load_voxelmorph,
    predict_field,
    train_voxelmorph,
)
from preprocessing.voxelmorph_losses import ngf_loss, smoothness_loss
from preprocessing.voxelmorph_net import (
    SpatialTransformer,
    VoxelMorph2D,
    VoxelMorphConfig,
    integrate_velocity,
)

CPU = torch.device("cpu")
TINY = VoxelMorphConfig(encoder_channels=(4, 4), decoder_channels=(4,), iterations=3,
                        batch_size=2)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # The test machine's two cores are shared: two intra-op threads stall each other there
    # (10x slower in our runs), one thread does not.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------
# A multi-contrast phantom: LGE-like fixed slice, T2w-like moving slice warped by a known field.

# tissue -> (LGE-like, T2w-like) intensity in [0, 1]; blood and myocardium swap polarity.
TISSUE = {"background": (0.35, 0.6), "fat": (0.8, 0.9), "blood": (0.55, 0.08),
          "myocardium": (0.12, 0.4), "lesion": (0.9, 0.8)}


def _soft(distance: np.ndarray) -> np.ndarray:
    """Membership with a ~1 pixel soft edge (distance < 0 inside)."""
    return 1.0 / (1.0 + np.exp(np.clip(distance / 0.4, -50, 50)))


def _disc(rows, cols, centre, radius):
    return _soft(np.hypot(rows - centre[0], cols - centre[1]) - radius)


def _angle_from(theta, angle):
    return np.abs(np.angle(np.exp(1j * (theta - angle))))


def _render(anatomy: dict, rows: np.ndarray, cols: np.ndarray, sequence: int):
    """Intensity of one sequence at continuous positions, and the myocardial wall membership."""
    centre = anatomy["centre"]
    dr, dc = rows - centre[0], (cols - centre[1]) * anatomy["ellipticity"]
    radius, theta = np.hypot(dr, dc), np.arctan2(dr, dc)
    r_in = anatomy["r_in"] + anatomy["wobble"] * np.cos(2 * theta + anatomy["phase"])
    r_out = r_in + anatomy["thickness"] + np.cos(theta - anatomy["phase"])
    wall, blood = _soft(radius - r_out), _soft(radius - r_in)

    def around(angle, distance):
        return centre + distance * np.array([np.sin(angle), np.cos(angle)])

    papillary = sum(_disc(rows, cols, around(a, anatomy["r_in"] - 2.5), 2.2)
                    for a in anatomy["papillary"])
    layers = [(_disc(rows, cols, c, r), values[sequence]) for c, r, values in anatomy["blobs"]]
    layers += [
        (_soft(radius - r_out - 2.5) * _soft(_angle_from(theta, anatomy["fat"]) - 0.8), "fat"),
        (_disc(rows, cols, around(anatomy["rv"], anatomy["r_in"] + anatomy["thickness"] + 6), 7),
         "blood"),
        (wall, "myocardium"), (blood, "blood"), (np.minimum(papillary, 1), "myocardium"),
        ((wall - blood) * _soft(_angle_from(theta, anatomy["lesion"]) * radius - 5), "lesion"),
    ]
    image = np.full(rows.shape, TISSUE["background"][sequence])
    for weight, value in layers:
        value = TISSUE[value][sequence] if isinstance(value, str) else value
        image = image * (1 - weight) + weight * value
    return image, wall - blood


def _phantom_pair(seed: int, size: int = 64, amplitude: float = 2.5):
    """``(fixed, moving, mask, true_field, ring)``; moving(true_field(p)) shows fixed's anatomy."""
    rng = np.random.default_rng(seed)
    anatomy = {
        "centre": size / 2 + rng.uniform(-3, 3, 2), "r_in": size * rng.uniform(0.13, 0.17),
        "thickness": rng.uniform(4, 6), "wobble": rng.uniform(0.5, 1.5),
        "phase": rng.uniform(0, 2 * np.pi), "ellipticity": rng.uniform(0.8, 1.2),
        "lesion": rng.uniform(0, 2 * np.pi), "rv": rng.uniform(0, 2 * np.pi),
        "papillary": rng.uniform(0, 2 * np.pi, 2), "fat": rng.uniform(0, 2 * np.pi),
        "blobs": [(size / 2 + rng.uniform(-size / 2, size / 2, 2), rng.uniform(2, 5),
                   rng.uniform(0.1, 0.9, 2)) for _ in range(6)],
    }
    grid = identity_field((size, size))
    fixed, wall = _render(anatomy, grid[0], grid[1], sequence=0)
    noise = np.stack([ndimage.gaussian_filter(rng.standard_normal((size, size)), 12, mode="wrap")
                      for _ in range(2)])
    displacement = noise * amplitude / np.hypot(*noise).max()
    # The moving slice is the anatomy seen through the inverse map (fixed-point iteration).
    inverse = grid.copy()
    for _ in range(20):
        inverse = grid - np.stack([ndimage.map_coordinates(d, inverse, order=1, mode="nearest")
                                   for d in displacement])
    moving, _ = _render(anatomy, inverse[0], inverse[1], sequence=1)
    fixed = fixed + 0.02 * rng.standard_normal(fixed.shape)
    moving = moving + 0.02 * rng.standard_normal(moving.shape)
    ring = wall > 0.5
    mask = ndimage.binary_dilation(ring, iterations=5).astype(np.float32)
    return (np.clip(fixed * 255, 0, 255), np.clip(moving * 255, 0, 255), mask,
            grid + displacement, ring)


def _smooth_random(shape, sigma: float, amplitude: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return noise * amplitude / np.abs(noise).max()


# ---------------------------------------------------------------------------------------------
# Spatial transformer


def test_zero_displacement_is_exact_identity() -> None:
    image = torch.rand(2, 3, 32, 48)
    zero = torch.zeros(2, 2, 32, 48)
    assert torch.equal(SpatialTransformer()(image, zero), image)
    labels = torch.randint(0, 4, (2, 1, 32, 48)).float()
    assert torch.equal(SpatialTransformer(mode="nearest")(labels, zero), labels)


def test_constant_row_displacement_samples_two_rows_down() -> None:
    image = np.random.default_rng(0).uniform(0, 255, (24, 20))
    displacement = np.zeros((2, 24, 20))
    displacement[0] = 2.0
    out = SpatialTransformer()(torch.tensor(image)[None, None],
                               torch.tensor(displacement)[None])[0, 0].numpy()
    np.testing.assert_array_equal(out[:-2], image[2:])
    np.testing.assert_array_equal(out[-2:], 0.0)  # sampled below the last row
    reference = ndimage.map_coordinates(image, identity_field(image.shape) + displacement,
                                        order=1, mode="constant", cval=0)
    np.testing.assert_allclose(out, reference, atol=1e-5)


def test_matches_transforms_warp_for_a_smooth_random_field() -> None:
    shape = (40, 36)
    image = ndimage.gaussian_filter(np.random.default_rng(1).uniform(0, 255, shape), 2)
    labels = (image > np.median(image)).astype(np.int64) + (image > image.mean() + 5)
    displacement = np.stack([_smooth_random(shape, 6, 3.3, seed) for seed in (2, 3)])
    field = identity_field(shape) + displacement
    torch_displacement = torch.tensor(displacement, dtype=torch.float32)[None]
    warped = SpatialTransformer()(torch.tensor(image, dtype=torch.float32)[None, None],
                                  torch_displacement)[0, 0].numpy()
    reference = warp(image, field, is_label=False)
    # Compare where float32 and float64 positions cannot disagree about lying inside the image.
    limit = np.array(shape)[:, None, None] - 1
    inside = np.all((field > 1e-3) & (field < limit - 1e-3), axis=0)
    outside = np.any((field < -1e-3) | (field > limit + 1e-3), axis=0)
    assert inside.sum() > 0.8 * inside.size and outside.sum() > 0  # both cases are exercised
    np.testing.assert_allclose(warped[inside] / 255, reference[inside] / 255, atol=1e-5)
    np.testing.assert_array_equal(warped[outside], 0.0)
    np.testing.assert_array_equal(reference[outside], 0.0)
    nearest = SpatialTransformer(mode="nearest")(torch.tensor(labels, dtype=torch.float32)[None,
                                                                                          None],
                                                 torch_displacement)[0, 0].numpy()
    np.testing.assert_array_equal(nearest, warp(labels, field, is_label=True))


def test_bilinear_warp_passes_gradient_to_the_displacement() -> None:
    image = torch.rand(1, 1, 16, 16)
    displacement = torch.full((1, 2, 16, 16), 0.3, requires_grad=True)
    SpatialTransformer()(image, displacement).sum().backward()
    assert displacement.grad is not None and displacement.grad.abs().sum() > 0


def test_spatial_transformer_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="displacement"):
        SpatialTransformer()(torch.rand(1, 1, 8, 8), torch.zeros(1, 2, 8, 9))
    with pytest.raises(ValueError, match="mode"):
        SpatialTransformer(mode="cubic")


def test_scaling_and_squaring_keeps_constant_fields_and_the_bound() -> None:
    constant = torch.zeros(1, 2, 16, 16)
    constant[:, 0], constant[:, 1] = 1.5, -0.75
    torch.testing.assert_close(integrate_velocity(constant, 6), constant)
    torch.testing.assert_close(integrate_velocity(constant, 6, scale=(4.0, 4.0)), constant)
    velocity = torch.tensor(np.stack([_smooth_random((32, 32), 3, 3.0, s) for s in (4, 5)]),
                            dtype=torch.float32)[None]
    bound = velocity.norm(dim=1).max()
    assert integrate_velocity(velocity, 7).norm(dim=1).max() <= bound + 1e-5


# ---------------------------------------------------------------------------------------------
# Losses


def _slice(seed: int = 7) -> torch.Tensor:
    fixed = _phantom_pair(seed, amplitude=0.0)[0]
    return torch.tensor(fixed / 255, dtype=torch.float32)[None, None]


def test_ngf_is_smallest_for_the_aligned_image_and_ignores_contrast_polarity() -> None:
    image = _slice()
    aligned = ngf_loss(image, image, 0.05)
    assert ngf_loss(image, 1 - image, 0.05).item() == pytest.approx(aligned.item(), rel=1e-6)
    raw = image * 255  # in raw units the noise floor scales with the intensity range
    assert (ngf_loss(raw, 255 - raw, 0.05 * 255).item()
            == pytest.approx(ngf_loss(raw, raw, 0.05 * 255).item(), rel=1e-5))
    for shift in ((1, 0), (0, 1), (2, 0), (0, -2), (1, 1)):
        shifted = torch.roll(image, shifts=shift, dims=(2, 3))
        assert ngf_loss(image, shifted, 0.05) > aligned + 0.01, shift


def test_ngf_known_values_for_ramps() -> None:
    rows, cols = torch.meshgrid(torch.arange(12.0), torch.arange(12.0), indexing="ij")
    a, b, eps = 0.2, -0.1, 0.05
    ramp_a, ramp_b = (a * cols)[None, None], (b * cols)[None, None]
    interior = torch.zeros(1, 1, 12, 12)
    interior[..., 1:-1, 1:-1] = 1  # central differences are a and b there
    expected = 1 - a * a * b * b / ((a * a + eps * eps) * (b * b + eps * eps))
    assert ngf_loss(ramp_a, ramp_b, eps, interior).item() == pytest.approx(expected, rel=1e-5)
    # Perpendicular edges are as far apart as NGF can tell.
    assert ngf_loss(ramp_a, (b * rows)[None, None], eps).item() == pytest.approx(1.0)


def test_ngf_mask_restricts_the_comparison() -> None:
    image = _slice()
    mask = torch.zeros_like(image)
    mask[..., 16:48, 16:48] = 1
    # Misalign everything except a margin around the mask (gradients there look 1 px out).
    changed = torch.roll(image, shifts=(2, -2), dims=(2, 3))
    changed[..., 14:50, 14:50] = image[..., 14:50, 14:50]
    assert ngf_loss(image, changed, 0.05, mask) == ngf_loss(image, image, 0.05, mask)
    assert ngf_loss(image, changed, 0.05) > ngf_loss(image, image, 0.05)
    # Weights, not counts: scaling the mask changes nothing.
    torch.testing.assert_close(ngf_loss(image, changed, 0.05, 3 * mask),
                               ngf_loss(image, changed, 0.05, mask))


def test_smoothness_is_zero_for_a_shift_and_a_squared_for_a_ramp() -> None:
    constant = torch.zeros(2, 2, 10, 12)
    constant[:, 0], constant[:, 1] = 1.7, -0.4
    assert smoothness_loss(constant).item() == 0.0
    rows, cols = torch.meshgrid(torch.arange(10.0), torch.arange(12.0), indexing="ij")
    ramp = torch.stack([0.3 * cols, torch.zeros_like(cols)])[None]
    # u_row = 0.3 col: d u_row / d col = 0.3 everywhere, every other derivative 0.
    assert smoothness_loss(ramp).item() == pytest.approx(0.09, rel=1e-6)
    shear = torch.stack([0.3 * cols, -0.5 * rows])[None]
    assert smoothness_loss(shear).item() == pytest.approx(0.09 + 0.25, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Training on the phantom (one model shared by the slow tests)

LEARN = VoxelMorphConfig(encoder_channels=(32, 32, 32, 32), decoder_channels=(32, 32),
                         iterations=600, batch_size=8, smoothness_weight=1.0, seed=0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[VoxelMorph2D, Path]:
    pairs = [_phantom_pair(seed)[:3] for seed in range(96)]
    checkpoint = tmp_path_factory.mktemp("voxelmorph") / "voxelmorph.pt"
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run outside the autouse one
    try:
        model = train_voxelmorph(pairs, LEARN, CPU, checkpoint_path=checkpoint, progress=False)
    finally:
        torch.set_num_threads(previous)
    return model, checkpoint


@pytest.mark.slow
def test_training_halves_the_ring_error_on_held_out_pairs(trained) -> None:
    model, _ = trained
    identity_error, predicted_error = [], []
    for seed in range(1000, 1006):
        fixed, moving, _, truth, ring = _phantom_pair(seed)
        field = predict_field(model, fixed, moving, CPU)
        assert field.shape == truth.shape and field.dtype == np.float64
        identity_error.append(np.hypot(*(truth - identity_field(fixed.shape)))[ring].mean())
        predicted_error.append(np.hypot(*(truth - field))[ring].mean())
    assert np.mean(predicted_error) <= 0.5 * np.mean(identity_error), (identity_error,
                                                                        predicted_error)


@pytest.mark.slow
def test_checkpoint_round_trip_gives_identical_predictions(trained) -> None:
    model, checkpoint = trained
    loaded = load_voxelmorph(checkpoint, CPU)
    assert loaded.config == LEARN and not loaded.training
    fixed, moving = _phantom_pair(2000)[:2]
    np.testing.assert_array_equal(predict_field(loaded, fixed, moving, CPU),
                                  predict_field(model, fixed, moving, CPU))
    payload = torch.load(checkpoint, weights_only=True)
    summary = payload["training"]
    assert VoxelMorphConfig.from_dict(payload["config"]) == LEARN
    assert summary["iterations"] == 600 and summary["num_pairs"] == 96
    assert summary["final_loss"] < summary["initial_loss"]


def test_predicted_field_plugs_into_the_transforms_module() -> None:
    fixed, moving = _phantom_pair(3)[:2]
    config = VoxelMorphConfig(encoder_channels=(4, 4), decoder_channels=(4, 4),
                              max_displacement_px=1.5, integration_steps=4)
    torch.manual_seed(0)
    model = VoxelMorph2D(config)
    with torch.no_grad():  # a visible, bounded random warp
        model.head.weight.normal_(std=0.5)
    field = predict_field(model, fixed, moving, CPU)
    displacement = field - identity_field(fixed.shape)
    assert np.abs(displacement).max() > 0.05 and np.hypot(*displacement).max() <= 1.5 + 1e-6
    unit = torch.tensor(np.stack([fixed, moving]) / 255, dtype=torch.float32)[:, None]
    with torch.no_grad():
        warped = model(unit[:1], unit[1:])[0][0, 0].numpy()
    np.testing.assert_allclose(warped, warp(moving / 255, field, is_label=False), atol=1e-4)
    composed = compose_fields(identity_field(fixed.shape) + 0.5, field)
    assert composed.shape == field.shape


def test_checkpoint_keeps_its_provenance(tmp_path: Path) -> None:
    pairs = [(np.full((16, 16), 100.0), np.full((16, 16), 50.0), None)] * 2
    recorded, bare = tmp_path / "recorded.pt", tmp_path / "bare.pt"
    provenance = {"preprocess": {"affine_metric": "ngf", "roi_size": 128}, "voxelmorph": {}}
    train_voxelmorph(pairs, TINY, CPU, checkpoint_path=recorded, progress=False,
                     provenance=provenance)
    train_voxelmorph(pairs, TINY, CPU, checkpoint_path=bare, progress=False)
    assert checkpoint_provenance(recorded) == provenance
    assert checkpoint_provenance(bare) == {}
    with pytest.raises(FileNotFoundError, match="absent"):
        checkpoint_provenance(tmp_path / "absent.pt")


# ---------------------------------------------------------------------------------------------
# Checkpoint failures, bad configs, bad input


def test_load_names_the_file_when_missing_corrupt_or_foreign(tmp_path: Path) -> None:
    missing = tmp_path / "absent.pt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_voxelmorph(missing, CPU)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match=re.escape(str(corrupt))):
        load_voxelmorph(corrupt, CPU)
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {}, "model_config": {}}, foreign)
    with pytest.raises(ValueError, match=r"foreign\.pt.*not a VoxelMorph"):
        load_voxelmorph(foreign, CPU)


def test_load_rejects_weights_that_do_not_fit_the_config(tmp_path: Path) -> None:
    path = tmp_path / "tiny.pt"
    pairs = [(np.full((16, 16), 100.0), np.full((16, 16), 50.0), None)] * 2
    train_voxelmorph(pairs, TINY, CPU, checkpoint_path=path, progress=False)
    payload = torch.load(path, weights_only=True)
    payload["config"]["encoder_channels"] = [8, 8]
    torch.save(payload, path)
    with pytest.raises(ValueError, match=r"tiny\.pt.*does not rebuild"):
        load_voxelmorph(path, CPU)


@pytest.mark.parametrize("bad", [
    {"encoder_channels": ()}, {"encoder_channels": (16, 0)}, {"encoder_channels": "16"},
    {"decoder_channels": (8, 8, 8, 8, 8)}, {"max_displacement_px": 0},
    {"max_displacement_px": float("inf")}, {"smoothness_weight": -1.0},
    {"similarity": "mse"}, {"ngf_epsilon": 0.0}, {"integration_steps": -1},
    {"integration_steps": 40}, {"iterations": 0}, {"batch_size": 0}, {"batch_size": True},
    {"learning_rate": -1e-3}, {"seed": -1}, {"augment": "yes"},
])
def test_bad_config_raises(bad: dict) -> None:
    with pytest.raises(ValueError):
        VoxelMorphConfig(**bad)


def test_config_dict_round_trip_and_unknown_keys() -> None:
    config = VoxelMorphConfig(encoder_channels=[8, 16], decoder_channels=[16], seed=3)
    assert config.encoder_channels == (8, 16)
    assert VoxelMorphConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown"):
        VoxelMorphConfig.from_dict({**config.to_dict(), "epochs": 3})


def test_non_finite_loss_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(voxelmorph_losses, "ngf_loss", lambda *args, **kwargs: torch.tensor(np.nan))
    pairs = [(np.full((16, 16), 100.0), np.full((16, 16), 50.0), None)] * 2
    with pytest.raises(FloatingPointError, match="iteration 0"):
        train_voxelmorph(pairs, TINY, CPU, progress=False)


@pytest.mark.parametrize("pairs, message", [
    ([], "at least one"),
    ([(np.zeros((16, 16)), np.zeros((16, 12)), None)], "must both be"),
    ([(np.zeros((14, 14)), np.zeros((14, 14)), None)], "multiple of 4"),
    ([(np.full((16, 16), np.nan), np.zeros((16, 16)), None)], "non-finite"),
    ([(np.zeros((16, 16)), np.zeros((16, 16)), np.zeros((16, 16)))], "not empty"),
    ([(np.zeros((16, 16)), np.zeros((16, 16)), np.ones((8, 8)))], "mask"),
])
def test_bad_training_pairs_raise(pairs, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        train_voxelmorph(pairs, TINY, CPU, progress=False)


def test_predict_rejects_mismatched_or_unsupported_sizes() -> None:
    model = VoxelMorph2D(TINY)
    with pytest.raises(ValueError, match="differ"):
        predict_field(model, np.zeros((16, 16)), np.zeros((16, 20)), CPU)
    with pytest.raises(ValueError, match="multiple of 4"):
        predict_field(model, np.zeros((18, 18)), np.zeros((18, 18)), CPU)
