"""Tests for the synthetic CMR phantom: layout, determinism, geometry, contrast and known motion."""

from __future__ import annotations

import dataclasses
import json
import math

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from datasets.labels import MODALITIES
from datasets.phantom import (
    MISALIGNED,
    case_paths,
    generate_case,
    misalignment_map,
    write_phantom_dataset,
)
from datasets.phantom_config import PhantomConfig, SequenceGeometry
from datasets.raw import discover_cases, load_case

SEEDS = (11, 12, 13, 14)
CODES = {0, 200, 500, 600, 1220, 2221}
LV_CODES = (200, 500, 1220, 2221)  # everything inside the LV epicardium
STILL = PhantomConfig(max_rotation_deg=0.0, max_translation_mm=0.0, max_scale=0.0,
                      nonrigid_mm=0.0)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng([2024, seed])


@pytest.fixture(scope="module")
def moving():
    """Cases with the default (MyoPS380-like) misalignment."""
    return [generate_case(f"case{seed:04d}", _rng(seed)) for seed in SEEDS]


@pytest.fixture(scope="module")
def still():
    """The same cases drawn with every misalignment magnitude set to zero."""
    return [generate_case(f"case{seed:04d}", _rng(seed), STILL) for seed in SEEDS]


def _data(image: nib.Nifti1Image) -> np.ndarray:
    return np.asarray(image.dataobj)


def _axes(image: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    affine, (nx, ny) = image.affine, image.shape[:2]
    return affine[0, 3] + affine[0, 0] * np.arange(nx), affine[1, 3] + affine[1, 1] * np.arange(ny)


def _slice_z(image: nib.Nifti1Image) -> np.ndarray:
    return image.affine[2, 3] + image.affine[2, 2] * np.arange(image.shape[2])


def _sample_label(image: nib.Nifti1Image, k: int, xy: np.ndarray) -> np.ndarray:
    """Nearest-neighbour label of slice ``k`` at in-plane world points ``[N, 2]``."""
    affine = image.affine
    index = [(xy[:, 0] - affine[0, 3]) / affine[0, 0], (xy[:, 1] - affine[1, 3]) / affine[1, 1]]
    return ndimage.map_coordinates(_data(image)[:, :, k], index, order=0, mode="constant")


def _grid_points(image: nib.Nifti1Image) -> np.ndarray:
    xs, ys = _axes(image)
    x, y = np.meshgrid(xs, ys, indexing="ij")
    return np.stack([x.ravel(), y.ravel()], axis=1)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1)


def _matched_slices(case, name: str, max_mm: float) -> list[tuple[int, int, float]]:
    """(LGE slice, slice of ``name``, z distance) pairs closer than ``max_mm``."""
    z_lge, z_other = _slice_z(case.label), _slice_z(case.images[name])
    pairs = []
    for k_lge, z in enumerate(z_lge):
        k = int(np.argmin(np.abs(z_other - z)))
        if abs(z_other[k] - z) <= max_mm:
            pairs.append((k_lge, k, float(abs(z_other[k] - z))))
    return pairs


# ----------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("kwargs", [
    {"snr": 0.0}, {"snr": -3.0}, {"max_scale": 0.6}, {"max_rotation_deg": -1.0},
    {"nonrigid_mm": math.nan}, {"bias_range": (1.1, 1.3)}, {"bias_range": (1.2, 0.8)},
    {"supersample": 0}, {"sub_slices": 0}, {"dtype": "uint8"}, {"scar_free_fraction": 1.5},
    {"phase_fov_fraction": (0.9, 0.8)}, {"fov_mm": 0.0}, {"endo_radius_mm": (30.0, 20.0)},
    {"lge": SequenceGeometry(0.8929, (6, 9))}, {"texture": 0.7}, {"blur_mm": -0.1},
])
def test_bad_config_raises(kwargs):
    with pytest.raises(ValueError):
        PhantomConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [
    {"in_plane_mm": 0.0, "n_slices": (3, 5)}, {"in_plane_mm": 1.0, "n_slices": (5, 3)},
    {"in_plane_mm": 1.0, "n_slices": (0, 3)}, {"in_plane_mm": 1.0, "n_slices": (3.5, 5)},
    {"in_plane_mm": 1.0, "n_slices": (3, 5), "slice_spacing_mm": (12.0, 10.0)},
    {"in_plane_mm": 1.0, "n_slices": (3, 5), "slice_thickness_mm": 0.0},
])
def test_bad_sequence_geometry_raises(kwargs):
    with pytest.raises(ValueError):
        SequenceGeometry(**kwargs)


def test_bad_arguments_raise(tmp_path):
    with pytest.raises(ValueError):
        generate_case("../case0001", _rng(1))
    for n_cases in (0, -2, 2.5, True):
        with pytest.raises(ValueError):
            write_phantom_dataset(tmp_path, n_cases)
    with pytest.raises(ValueError):
        write_phantom_dataset(tmp_path, 1, seed=-1)
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------- determinism


def test_same_seed_same_case_other_seed_other_case(moving):
    again = generate_case("case0011", _rng(SEEDS[0]))
    first = moving[0]
    for name in MODALITIES:
        assert np.array_equal(_data(again.images[name]), _data(first.images[name]))
        assert np.array_equal(again.images[name].affine, first.images[name].affine)
    assert np.array_equal(_data(again.label), _data(first.label))
    assert json.dumps(again.truth, sort_keys=True) == json.dumps(first.truth, sort_keys=True)
    other = moving[1]
    assert not np.array_equal(_data(other.images["LGE"])[:20, :20],
                              _data(first.images["LGE"])[:20, :20])
    assert other.truth["anatomy"] != first.truth["anatomy"]


def test_misalignment_settings_leave_anatomy_and_reference_unchanged(moving, still):
    for a, b in zip(moving, still, strict=True):
        assert a.truth["anatomy"] == b.truth["anatomy"]
        for name in MODALITIES:
            assert a.truth["sequences"][name]["slice_z_mm"] == (
                b.truth["sequences"][name]["slice_z_mm"])
        assert np.array_equal(_data(a.label), _data(b.label))
        assert np.array_equal(_data(a.images["LGE"]), _data(b.images["LGE"]))


# ---------------------------------------------------------------------------- files and layout


def test_dataset_layout_is_readable_and_independent_of_case_count(tmp_path):
    ids = write_phantom_dataset(tmp_path, 2, seed=7)
    assert ids == ["case0001", "case0002"]
    for case_id in ids:
        paths = case_paths(tmp_path, case_id)
        assert paths["bSSFP"] == tmp_path / "Raw_data" / "bSSFP" / f"{case_id}.nii.gz"
        assert paths["label"] == tmp_path / "Raw_data" / "label" / f"{case_id}_gt.nii.gz"
        assert paths["truth"] == tmp_path / "phantom_truth" / f"{case_id}.json"
        for key, path in paths.items():
            assert path.is_file(), key
        for name in MODALITIES:
            image = nib.load(paths[name])
            assert image.get_data_dtype() == np.int16
            assert _data(image).max() > 500
        label = nib.load(paths["label"])
        assert np.allclose(label.affine, nib.load(paths["LGE"]).affine)
        assert label.shape == nib.load(paths["LGE"]).shape
        assert set(np.unique(_data(label)).tolist()) <= CODES
        for name in MISALIGNED:
            truth_label = nib.load(paths[f"truth_{name}"])
            assert np.allclose(truth_label.affine, nib.load(paths[name]).affine)
        truth = json.loads(paths["truth"].read_text())
        assert truth["seed"] == [7, int(case_id[4:])]
        assert truth["sequences"]["LGE"]["misalignment"] is None
    # Case i comes from (seed, i) alone, so a longer dataset would hold the same case0002.
    alone = generate_case("case0002", np.random.default_rng([7, 2]))
    for name in MODALITIES:
        stored = nib.load(case_paths(tmp_path, "case0002")[name])
        assert np.array_equal(_data(stored), _data(alone.images[name]))
    # The framework's raw reader accepts the layout and finds the label on the LGE grid.
    cases = discover_cases(tmp_path)
    assert [case.case_id for case in cases] == ids
    loaded = load_case(cases[0])
    assert loaded.label_modality == "LGE"
    assert set(np.unique(loaded.label.array).tolist()) <= {0, 1, 2, 3}


def test_existing_cases_are_kept_repaired_or_refused(tmp_path):
    write_phantom_dataset(tmp_path, 1, seed=3)
    paths = case_paths(tmp_path, "case0001")
    stamps = {key: path.stat().st_mtime_ns for key, path in paths.items()}
    before = _data(nib.load(paths["T2w"])).copy()
    write_phantom_dataset(tmp_path, 1, seed=3)
    assert {key: path.stat().st_mtime_ns for key, path in paths.items()} == stamps
    paths["T2w"].unlink()  # an interrupted case is regenerated identically
    write_phantom_dataset(tmp_path, 1, seed=3)
    assert np.array_equal(_data(nib.load(paths["T2w"])), before)
    with pytest.raises(FileExistsError):
        write_phantom_dataset(tmp_path, 1, seed=4)
    write_phantom_dataset(tmp_path, 1, seed=4, overwrite=True)
    assert json.loads(paths["truth"].read_text())["seed"] == [4, 1]
    assert not np.array_equal(_data(nib.load(paths["T2w"])), before)


# -------------------------------------------------------------------------- labels and geometry


def test_label_codes(moving):
    config = PhantomConfig()
    seen = {code: 0 for code in CODES - {0}}
    for case in moving:
        label = _data(case.label)
        assert set(np.unique(label).tolist()) <= CODES
        for code in seen:
            seen[code] += bool(np.any(label == code))
        mid = label[:, :, label.shape[2] // 2]
        assert np.any(mid == 200) and np.any(mid == 500)
        for name in MISALIGNED:
            assert set(np.unique(_data(case.truth_labels[name])).tolist()) <= CODES
        has_scar = case.truth["anatomy"]["pathology"]["scar_present"]
        assert has_scar == bool(np.any(label == 2221))
    assert seen[200] == seen[500] == seen[600] == len(moving)
    assert seen[1220] >= len(moving) - 1
    assert seen[2221] >= math.floor(len(moving) * (1 - config.scar_free_fraction)) - 1


def test_scar_free_cases_keep_edema():
    case = generate_case("case0001", _rng(SEEDS[0]), PhantomConfig(scar_free_fraction=1.0))
    label = _data(case.label)
    assert not np.any(label == 2221)
    assert np.any(label == 1220)
    assert case.truth["anatomy"]["pathology"]["scar_present"] is False


def test_sequence_geometry(moving):
    config = PhantomConfig()
    for case in moving:
        counts = {name: case.images[name].shape[2] for name in MODALITIES}
        assert counts["LGE"] < counts["T2w"] < counts["bSSFP"]
        affines = {name: case.images[name].affine for name in MODALITIES}
        assert not np.allclose(affines["LGE"], affines["T2w"])
        assert not np.allclose(affines["LGE"], affines["bSSFP"])
        for name in MODALITIES:
            geometry, image = config.geometry(name), case.images[name]
            spacing = np.linalg.norm(image.affine[:3, :3], axis=0)
            assert spacing[0] == pytest.approx(geometry.in_plane_mm)
            assert geometry.slice_spacing_mm[0] <= spacing[2] <= geometry.slice_spacing_mm[1]
            assert image.shape[0] * spacing[0] == pytest.approx(config.fov_mm, abs=spacing[0])
            record = case.truth["sequences"][name]
            assert np.allclose(record["slice_z_mm"], _slice_z(image))
            assert np.allclose(record["affine"], image.affine)
        lge = case.images["LGE"].header.get_zooms()
        assert lge[0] < case.images["bSSFP"].header.get_zooms()[0]


def test_heart_centre_agrees_in_world_coordinates(moving, still):
    config = PhantomConfig()
    bound = (config.max_translation_mm + config.nonrigid_mm) / (1 - config.max_scale) + 1.0
    worst_moving, pairs = 0.0, 0
    for case_moving, case_still in zip(moving, still, strict=True):
        tilt = math.hypot(*case_moving.truth["anatomy"]["heart"]["tilt"])
        for name in MISALIGNED:
            for k_lge, k, dz in _matched_slices(case_moving, name, max_mm=6.0):
                centres = []
                for image, index in ((case_moving.label, k_lge),
                                     (case_moving.truth_labels[name], k),
                                     (case_still.truth_labels[name], k)):
                    i, j = np.nonzero(_data(image)[:, :, index] == 500)
                    xs, ys = _axes(image)
                    centres.append(np.array([xs[i].mean(), ys[j].mean()]))
                reference, shifted, aligned = centres
                pairs += 1
                assert np.linalg.norm(aligned - reference) <= tilt * dz + 0.5
                error = np.linalg.norm(shifted - reference) - tilt * dz
                assert error <= bound
                worst_moving = max(worst_moving, error)
    assert pairs >= len(moving)
    assert worst_moving > 0.5  # the default misalignment is visible


# --------------------------------------------------------------------------------- contrast


def _means(image: nib.Nifti1Image, label: nib.Nifti1Image) -> dict[int, float]:
    values, codes = _data(image).astype(np.float64), _data(label)
    return {code: float(values[codes == code].mean()) for code in CODES if np.any(codes == code)}


def test_sequence_contrasts(moving):
    for case in moving:
        bssfp = _means(case.images["bSSFP"], case.truth_labels["bSSFP"])
        lge = _means(case.images["LGE"], case.label)
        t2w = _means(case.images["T2w"], case.truth_labels["T2w"])
        assert bssfp[500] > 2 * bssfp[200] and bssfp[600] > 2 * bssfp[200]
        assert bssfp[1220] > bssfp[200]
        assert lge[500] > 2 * lge[200]
        if 2221 in lge:
            assert lge[2221] > 3 * lge[200] and lge[2221] > lge[500]
            assert t2w[2221] > t2w[200]
        assert abs(lge[1220] - lge[200]) < 0.25 * (lge[500] - lge[200])
        assert t2w[1220] > 1.3 * t2w[200]
        assert t2w[500] < t2w[200] and t2w[600] < t2w[200]


def test_noise_free_float_output_has_exact_background():
    config = PhantomConfig(snr=math.inf, dtype="float32")
    case = generate_case("case0001", _rng(SEEDS[0]), config)
    noisy = generate_case("case0001", _rng(SEEDS[0]))
    for name in MODALITIES:
        clean = _data(case.images[name])
        assert clean.dtype == np.float32
        assert np.all(clean[:4, :4] == 0)  # air in the field-of-view corners
        assert np.all(_data(noisy.images[name])[:4, :4].astype(float).mean() > 0)
    assert case.truth["config"]["snr"] == "inf"
    json.dumps(case.truth, allow_nan=False)


# ------------------------------------------------------------------------- known misalignment


def test_recorded_misalignment_is_within_config_and_invertible(moving):
    config = PhantomConfig()
    for case in moving:
        assert case.truth["sequences"]["LGE"]["misalignment"] is None
        for name in MISALIGNED:
            record = case.truth["sequences"][name]
            slices = record["misalignment"]["slices"]
            assert len(slices) == case.images[name].shape[2]
            points = _grid_points(case.images[name])
            for k, sl in enumerate(slices):
                assert abs(sl["rotation_deg"]) <= config.max_rotation_deg
                assert np.linalg.norm(sl["translation_mm"]) <= config.max_translation_mm
                assert abs(sl["scale"] - 1) <= config.max_scale
                # W minus its similarity part is the recorded non-rigid field.
                angle = math.radians(sl["rotation_deg"])
                rotation = sl["scale"] * np.array([[math.cos(angle), -math.sin(angle)],
                                                   [math.sin(angle), math.cos(angle)]])
                centre = np.asarray(sl["centre_mm"])
                similar = centre + np.asarray(sl["translation_mm"]) + (points - centre) @ rotation.T
                amplitude = sl["nonrigid"]["amplitude_mm"]
                assert 0.5 * config.nonrigid_mm <= amplitude <= config.nonrigid_mm
                if k in (0, len(slices) - 1):  # the whole grid is slow; two slices suffice
                    field = misalignment_map(record, k, points) - similar
                    assert np.linalg.norm(field, axis=1).max() == pytest.approx(amplitude,
                                                                                abs=1e-3)
                sample = points[::211]
                there = misalignment_map(record, k, sample)
                assert np.allclose(misalignment_map(record, k, there, inverse=True), sample,
                                   atol=1e-6)


def test_truth_labels_follow_the_recorded_map(moving, still):
    """A moved truth label equals the still one sampled through W; without W it does not."""
    for case_moving, case_still in zip(moving, still, strict=True):
        for name in MISALIGNED:
            record = case_moving.truth["sequences"][name]
            points = _grid_points(case_moving.truth_labels[name])
            mapped, identity = [], []
            for k in range(case_moving.truth_labels[name].shape[2]):
                moved = np.isin(_data(case_moving.truth_labels[name])[:, :, k].ravel(), LV_CODES)
                if np.count_nonzero(moved) < 100:
                    continue
                through = _sample_label(case_still.truth_labels[name], k,
                                        misalignment_map(record, k, points))
                direct = _data(case_still.truth_labels[name])[:, :, k].ravel()
                mapped.append(_dice(moved, np.isin(through, LV_CODES)))
                identity.append(_dice(moved, np.isin(direct, LV_CODES)))
            assert min(mapped) > 0.95
            assert np.mean(mapped) > np.mean(identity) + 0.02


def test_overlap_with_resampled_lge_label(moving, still):
    """Zero misalignment: truth labels overlap the LGE label; default misalignment: less."""
    dice = {"still": [], "moving": []}
    for key, cases in (("still", still), ("moving", moving)):
        for case in cases:
            for name in MISALIGNED:
                points = _grid_points(case.truth_labels[name])
                for k_lge, k, _ in _matched_slices(case, name, max_mm=1.0):
                    own = np.isin(_data(case.truth_labels[name])[:, :, k].ravel(), LV_CODES)
                    lge = np.isin(_sample_label(case.label, k_lge, points), LV_CODES)
                    dice[key].append(_dice(own, lge))
    assert len(dice["still"]) == len(dice["moving"]) >= 2
    assert min(dice["still"]) > 0.95
    assert np.mean(dice["moving"]) < np.mean(dice["still"]) - 0.02


def test_truth_is_plain_json_and_records_the_config(moving):
    truth, config = moving[0].truth, PhantomConfig()
    assert json.loads(json.dumps(truth, allow_nan=False)) == truth
    recorded = truth["config"]
    assert set(recorded) == {field.name for field in dataclasses.fields(PhantomConfig)}
    assert recorded["lge"]["in_plane_mm"] == config.lge.in_plane_mm
    assert tuple(recorded["bssfp"]["n_slices"]) == config.bssfp.n_slices
    assert recorded["max_translation_mm"] == config.max_translation_mm
