"""Agreement of independent estimators: known factor structure, geometry, a phantom with truth."""

from __future__ import annotations

import math

import numpy as np
import pytest

from datasets.phantom import generate_case, misalignment_map, write_case
from datasets.phantom_config import PhantomConfig
from datasets.raw import discover_cases, load_case
from preprocessing.affine_estimators import independent_estimators, reference_transforms
from preprocessing.alignment_error import myocardial_errors
from preprocessing.pipeline import PreprocessConfig, align_case
from preprocessing.reference_agreement import heart_offsets, myocardial_offsets, split_agreement
from preprocessing.transforms import Affine2D


def _isotropic(rng, rms, count):
    """2D offsets whose rms length is ``rms``."""
    return rng.normal(0.0, rms / math.sqrt(2), (count, 2))


def test_equal_gains_give_the_common_offset_and_each_noise():
    rng = np.random.default_rng(0)
    count = 20000
    common = _isotropic(rng, 1.2, count)
    noise = (0.5, 1.0, 2.0)
    offsets = {name: common + _isotropic(rng, s, count)
               for name, s in zip("abc", noise, strict=True)}
    split = split_agreement(offsets, bootstrap=50)
    assert split.common == pytest.approx(1.2, rel=0.05)
    low, high = split.common_interval
    assert low < split.common < high
    for value in split.pair_common.values():
        assert value == pytest.approx(1.2, rel=0.08)
    for name, s in zip("abc", noise, strict=True):
        assert split.own_rms[name] == pytest.approx(s, rel=0.06), name
        assert split.rms_offset[name] == pytest.approx(math.hypot(1.2, s), rel=0.03)
    assert split.slices == count


def test_a_metric_that_stops_short_lowers_only_its_pairs():
    """Gains below 1 make pair values lower bounds: the pair of full followers keeps the truth."""
    rng = np.random.default_rng(3)
    count = 20000
    common = _isotropic(rng, 1.5, count)
    offsets = {"full": common + _isotropic(rng, 1.0, count),
               "also full": common + _isotropic(rng, 1.0, count),
               "shrunk": 0.3 * common + _isotropic(rng, 1.0, count)}
    split = split_agreement(offsets, bootstrap=0)
    assert split.pair_common["full x also full"] == pytest.approx(1.5, rel=0.05)
    assert split.pair_common["full x shrunk"] == pytest.approx(1.5 * math.sqrt(0.3), rel=0.08)
    assert split.common < 1.5 * 0.85
    assert math.isnan(split.common_interval[0])


def test_estimators_that_share_nothing_see_no_common_part():
    rng = np.random.default_rng(1)
    offsets = {name: _isotropic(rng, 1.0, 5000) for name in "abcd"}
    split = split_agreement(offsets, bootstrap=200)
    assert split.common < 0.15
    assert split.common_interval[0] == 0.0  # zero common part is within the interval
    for name in offsets:
        assert split.own_rms[name] == pytest.approx(1.0, rel=0.05)


def test_identical_estimators_are_all_common():
    rng = np.random.default_rng(2)
    shared = _isotropic(rng, 2.0, 400)
    split = split_agreement({"a": shared, "b": shared.copy(), "c": shared.copy()}, bootstrap=10)
    rms = float(np.sqrt((shared ** 2).sum(axis=1).mean()))
    assert split.common == pytest.approx(rms)
    for name in "abc":
        assert split.own_rms[name] == pytest.approx(0.0, abs=1e-6)


def test_split_refuses_what_it_cannot_use():
    good = np.zeros((5, 2))
    with pytest.raises(ValueError, match="at least three"):
        split_agreement({"a": good, "b": good})
    with pytest.raises(ValueError, match="'c' are"):
        split_agreement({"a": good, "b": good, "c": np.zeros((4, 2))})
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        split_agreement({"a": np.zeros((5, 3)), "b": good, "c": good})
    bad = good.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="'b' are not all finite"):
        split_agreement({"a": good, "b": bad, "c": good})


def test_grouped_rows_are_redrawn_by_slice():
    """Points of one slice share its error: counting them as independent would narrow the
    interval; redrawing whole slices keeps it as wide as the slices alone give."""
    rng = np.random.default_rng(4)
    common = _isotropic(rng, 1.0, 60)
    per_slice = {name: common + _isotropic(rng, 1.0, 60) for name in "abc"}
    copies = 25
    points = {name: np.repeat(values, copies, axis=0) for name, values in per_slice.items()}
    groups = np.repeat(np.arange(60), copies)
    by_slice = split_agreement(per_slice, bootstrap=400, seed=5)
    grouped = split_agreement(points, groups=groups, bootstrap=400, seed=5)
    naive = split_agreement(points, bootstrap=400, seed=5)
    assert grouped.slices == 60 and naive.slices == 60 * copies
    assert grouped.common == pytest.approx(by_slice.common)

    def width(split):
        return split.common_interval[1] - split.common_interval[0]

    assert width(grouped) == pytest.approx(width(by_slice), rel=0.25)
    assert width(naive) < 0.5 * width(grouped)
    with pytest.raises(ValueError, match=r"groups must be \[1500\]"):
        split_agreement(points, groups=groups[:-1])


def test_myocardial_offsets_are_the_field_over_every_pixel():
    mask = np.zeros((2, 30, 30), bool)
    mask[0, 5:15, 5:15] = True
    mask[1, 10:12, 3:6] = True
    shift = Affine2D.from_parameters(translation=(1.0, 2.0))
    turn = Affine2D.from_parameters(rotation_deg=10.0, centre=(9.5, 9.5))
    offsets, slices = myocardial_offsets([turn, shift], mask, 2.0)
    assert offsets.shape == (106, 2) and np.array_equal(np.bincount(slices), [100, 6])
    assert offsets[slices == 1] == pytest.approx(np.tile([2.0, 4.0], (6, 1)))
    # A rotation about the square's centre moves every pixel but not the square's centre.
    assert offsets[slices == 0].mean(axis=0) == pytest.approx((0.0, 0.0), abs=1e-9)
    radius = np.linalg.norm(np.argwhere(mask[0]) - 9.5, axis=1) * 2.0
    assert np.linalg.norm(offsets[slices == 0], axis=1) == pytest.approx(
        2 * np.sin(np.deg2rad(5.0)) * radius)
    with pytest.raises(ValueError, match="1 transforms for 2 masks"):
        myocardial_offsets([shift], mask, 1.0)


def test_heart_offsets_follow_the_mask_centre():
    mask = np.zeros((1, 40, 40), bool)
    mask[0, 10:20, 14:30] = True  # centre (14.5, 21.5)
    centre = (14.5, 21.5)
    shifted = Affine2D.from_parameters(translation=(2.0, -1.0))
    rotated = Affine2D.from_parameters(rotation_deg=7.0, scale=1.05, centre=centre)
    off_centre = Affine2D.from_parameters(rotation_deg=90.0, centre=(0.0, 0.0))
    assert heart_offsets([shifted], mask, 1.0)[0] == pytest.approx((2.0, -1.0))
    assert heart_offsets([shifted], mask, 1.5)[0] == pytest.approx((3.0, -1.5))
    assert heart_offsets([rotated], mask, 1.0)[0] == pytest.approx((0.0, 0.0), abs=1e-9)
    expected = off_centre.matrix @ np.array(centre) - np.array(centre)
    assert heart_offsets([off_centre], mask, 1.0)[0] == pytest.approx(expected)
    with pytest.raises(ValueError, match="2 transforms for 1 masks"):
        heart_offsets([shifted, shifted], mask, 1.0)
    with pytest.raises(ValueError, match="empty mask"):
        heart_offsets([shifted], np.zeros((1, 5, 5), bool), 1.0)


def test_phantom_offsets_match_the_known_misalignment(tmp_path):
    """On phantom T2w slices the image metrics find the phantom's own heart offsets, and their
    pair sees the true rms offset as the common part."""
    truths = {}
    for seed in (21, 22):
        case = generate_case(f"case{seed:04d}", np.random.default_rng(seed), PhantomConfig())
        write_case(case, tmp_path)
        truths[case.case_id] = case.truth
    config = PreprocessConfig(affine_registration=False)
    estimators = independent_estimators(config.affine)
    found: dict[str, list[np.ndarray]] = {}
    true_lengths = []
    for files in discover_cases(tmp_path):
        truth = truths[files.case_id]
        aligned = align_case(load_case(files), config)
        myocardium = aligned.label > 0
        transforms = reference_transforms(
            aligned.unregistered[aligned.fixed].astype(np.float32), myocardium,
            aligned.unregistered["T2w"].astype(np.float32),
            aligned.metric_mask(config.affine.mask_margin_mm, config.pixel_spacing_mm),
            estimators)
        offsets = {name: heart_offsets(fits, myocardium, config.pixel_spacing_mm)
                   for name, fits in transforms.items()}
        fields = {name: np.stack(aligned.affine_fields[name]) for name in aligned.moving}
        errors = myocardial_errors(
            aligned, fields,
            lambda name, index, xy, truth=truth: misalignment_map(truth["sequences"][name],
                                                                  index, xy),
            lambda name, world: world[:, :2])["T2w"]
        # The heart sits where the mean error of its pixels points back to (first order).
        true_lengths += np.linalg.norm(errors.centre_errors("none"), axis=1).tolist()
        for name, values in offsets.items():
            found.setdefault(name, []).append(values)
    true_lengths = np.array(true_lengths)
    lengths = {name: np.linalg.norm(np.concatenate(parts), axis=1)
               for name, parts in found.items()}
    for name in ("NGF to image", "MI to image"):
        assert np.abs(lengths[name] - true_lengths).mean() < 0.4, name
    split = split_agreement({name: np.concatenate(parts) for name, parts in found.items()},
                            bootstrap=20)
    true_rms = float(np.sqrt((true_lengths ** 2).mean()))
    assert true_rms > 2.0
    assert split.pair_common["NGF to image x MI to image"] == pytest.approx(true_rms, rel=0.15)
    for value in split.pair_common.values():
        assert value < true_rms * 1.15  # no pair sees more than there is
