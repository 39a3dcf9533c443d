"""nnU-Net on our processed layout: label-free grid volumes out, probabilities back to native
space through the mapping test.py uses; and the wall-clock budget's epoch planning."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from baselines import nnunet_data
from baselines.nnunet import planned_epochs
from datasets.phantom import write_phantom_dataset
from datasets.processed import ProcessedLayout
from datasets.raw import discover_cases, read_volume
from preprocessing.pipeline import PreprocessConfig
from preprocessing.runner import RunOptions, run_preprocessing

FOLDS = 2


@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    base = tmp_path_factory.mktemp("nnunet_processed")
    write_phantom_dataset(base / "raw", 2, seed=3)
    config = PreprocessConfig(affine_registration=False, nonrigid_registration=False)
    run_preprocessing(base / "raw", base / "processed", config,
                      RunOptions(test_every=0, folds=FOLDS, qa=False))
    return base / "raw", base / "processed"


@pytest.fixture(scope="module")
def exported(processed, tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    return work, nnunet_data.export_processed(processed[1], work, folds=FOLDS)


def _array(path):
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), image.GetSpacing()


def test_channels_and_label_are_the_stored_test_volume(processed, exported):
    _, target = exported
    layout = ProcessedLayout(processed[1])
    names = layout.scan("test_vol")
    assert len(names) == 2
    for name in names:
        stored = layout.read_stored_volume(name)
        for index, channel in enumerate(("0000", "0001", "0002")):
            array, spacing = _array(target / "imagesTr" / f"{name}_{channel}.nii.gz")
            assert np.allclose(array, stored.images[:, index])
            # SimpleITK spacing is (column, row, slice); ours (slice, row, column).
            assert np.allclose(spacing, stored.spacing[::-1])
        label, _ = _array(target / "labelsTr" / f"{name}.nii.gz")
        assert np.array_equal(label, stored.label)
    meta = json.loads((target / "dataset.json").read_text())
    assert meta["immseg_source"] == {"kind": "processed", "root": str(processed[1].resolve())}
    assert [fold["val"] for fold in json.loads((target / "splits_final.json").read_text())] \
        == [[names[0]], [names[1]]]


def _predict_like_nnunet(work, target, probabilities: bool):
    """Stand in for nnU-Net: each fold's "prediction" is the stored label, with its one-hot
    class probabilities ``[K, D, H, W]`` in the .npz nnU-Net writes."""
    for k, fold in enumerate(json.loads((target / "splits_final.json").read_text())):
        folder = work / "nnUNet_results" / "Dataset501_MyoPS" / "T__P__2d" / f"fold_{k}" \
            / "validation"
        folder.mkdir(parents=True, exist_ok=True)
        for case in fold["val"]:
            label_file = target / "labelsTr" / f"{case}.nii.gz"
            sitk.WriteImage(sitk.ReadImage(str(label_file)), str(folder / f"{case}.nii.gz"))
            if probabilities:
                label, _ = _array(label_file)
                onehot = np.moveaxis(np.eye(4, dtype=np.float32)[label], -1, 0)
                np.savez(folder / f"{case}.npz", probabilities=onehot)


def test_probabilities_are_read_slice_first(tmp_path):
    rng = np.random.default_rng(0)
    probabilities = rng.random((4, 3, 5, 7)).astype(np.float32)  # nnU-Net: [K, D, H, W]
    labels = probabilities.argmax(0).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(labels), str(tmp_path / "c.nii.gz"))
    np.savez(tmp_path / "c.npz", probabilities=probabilities)
    read = nnunet_data.probabilities_of(tmp_path / "c.nii.gz")
    assert read.shape == (3, 4, 5, 7) and np.array_equal(read, np.moveaxis(probabilities, 0, 1))
    (tmp_path / "c.npz").unlink()  # without them: the one-hot of the label map
    onehot = nnunet_data.probabilities_of(tmp_path / "c.nii.gz")
    assert np.array_equal(onehot.argmax(1), labels) and np.all(onehot.sum(1) == 1)


@pytest.mark.parametrize("probabilities", [True, False])
def test_predictions_are_scored_on_the_grid_and_in_native_space(processed, exported,
                                                                probabilities, tmp_path):
    raw, _ = processed
    _, target = exported
    work = tmp_path / "work"
    # Each parametrisation predicts into its own results tree beside the shared export.
    (work / "nnUNet_raw").mkdir(parents=True)
    (work / "nnUNet_raw" / target.name).symlink_to(target)
    _predict_like_nnunet(work, target, probabilities)
    scores = nnunet_data.score(work)
    assert scores.space == "native" and not scores.roi_given
    grid = scores.grid.summary()
    assert grid["whole myocardium"]["dice"]["mean"] == pytest.approx(1.0)
    native = scores.native.summary()
    # The grid label is the raw label resampled to 1 mm; mapped back it nearly covers it.
    assert native["whole myocardium"]["dice"]["mean"] > 0.85
    for files in discover_cases(raw):
        mapped = read_volume(work / "predictions" / f"{files.case_id}.nii.gz", is_label=True)
        assert mapped.same_geometry(read_volume(files.label, is_label=True))
    written = json.loads((work / "test" / "summary.json").read_text())
    assert written["space"] == "native" and "whole crop grids" in written["obtained"]
    with pytest.raises(ValueError, match="no nnU-Net prediction"):
        nnunet_data.score_processed(work, processed[1], only=["case9999"])


def test_budget_plans_the_schedule_from_the_mean_epoch():
    # 2 epochs took 100 s: 900 s left allow 18 more.
    assert planned_epochs(2, 100.0, 1000.0, cap=1000) == 20
    assert planned_epochs(2, 100.0, 1000.0, cap=10) == 10   # the epoch cap holds
    assert planned_epochs(5, 1200.0, 1000.0, cap=1000) == 5  # over budget: stop here
    assert planned_epochs(3, 290.0, 300.0, cap=1000) == 3   # less than one epoch left
    assert planned_epochs(0, 0.0, 300.0, cap=1000) == 1000  # nothing measured yet
