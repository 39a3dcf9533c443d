"""The nnU-Net exporters (raw and processed) and the way back to our scorer, and the budget
planning of the trainer (nnunetv2 itself is an optional extra)."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from baselines import nnunet, nnunet_data
from datasets.folds import fold_cases
from datasets.phantom import write_phantom_dataset
from datasets.raw import discover_cases, load_case, read_volume


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    # Phantom sequences differ in pixel size, slice count and position: resampling is needed.
    root = tmp_path_factory.mktemp("phantom")
    write_phantom_dataset(root, 5, seed=7)
    return root


@pytest.fixture(scope="module")
def exported(phantom, tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    return work, nnunet_data.export_raw(phantom, work, folds=5)


def test_channels_share_the_reference_grid_and_labels_are_ours(phantom, exported):
    _, target = exported
    for files in discover_cases(phantom):
        case = load_case(files)
        assert case.label_modality == "LGE"  # the phantom's labelled reference
        lge = nib.load(target / "imagesTr" / f"{files.case_id}_0001.nii.gz")
        assert np.allclose(lge.affine, case.images["LGE"].affine, atol=1e-3)
        for channel in ("0000", "0002"):
            other = nib.load(target / "imagesTr" / f"{files.case_id}_{channel}.nii.gz")
            assert other.shape == lge.shape and np.allclose(other.affine, lge.affine, atol=1e-3)
        # LGE itself is copied, not interpolated.
        assert np.allclose(np.asarray(lge.dataobj), np.asarray(
            nib.load(files.images["LGE"]).dataobj), atol=1e-3)
        label = np.asarray(nib.load(target / "labelsTr" / f"{files.case_id}.nii.gz").dataobj)
        assert np.array_equal(np.transpose(label, (2, 1, 0)), case.label.array)
        assert set(np.unique(label)) <= {0, 1, 2, 3}


def test_dataset_json_and_our_folds(phantom, exported):
    _, target = exported
    meta = json.loads((target / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "bSSFP", "1": "LGE", "2": "T2w"}
    assert meta["labels"] == {"background": 0, "myocardium": 1, "scar": 2, "edema": 3}
    assert meta["numTraining"] == 5 and meta["file_ending"] == ".nii.gz"
    assert meta["immseg_source"]["kind"] == "raw"
    assert meta["immseg_source"]["root"] == str(phantom.resolve())
    ids = sorted(c.case_id for c in discover_cases(phantom))
    folds = json.loads((target / "splits_final.json").read_text())
    assert len(folds) == 5
    for k, fold in enumerate(folds):
        train, test = fold_cases(ids, 5, k)
        assert fold == {"train": sorted(train), "val": sorted(test)}
    assert folds[0]["val"] == ids[0::5]  # fold 0 = the release's split


def test_predictions_go_back_to_the_label_grid_and_our_scorer(phantom, exported):
    work, target = exported
    # Stand in for nnU-Net: its "predictions" are the exported labels, on the reference grid.
    for k in (0, 1):
        folder = work / "nnUNet_results" / "Dataset501_MyoPS" / "T__P__2d" / f"fold_{k}"
        (folder / "validation").mkdir(parents=True)
        for case in json.loads((target / "splits_final.json").read_text())[k]["val"]:
            shutil.copy(target / "labelsTr" / f"{case}.nii.gz", folder / "validation")
    with pytest.raises(ValueError, match="no label map for 3"):  # folds 2-4 not run yet
        nnunet_data.score(work)
    assert len(nnunet_data.score(work, folds=[0, 1])) == 2
    partial = json.loads((work / "test" / "summary.json").read_text())
    assert partial["settings"]["evaluation"] == "out of fold, fold(s) 0, 1 of 5"
    for k in (2, 3, 4):
        folder = work / "nnUNet_results" / "Dataset501_MyoPS" / "T__P__2d" / f"fold_{k}"
        (folder / "validation").mkdir(parents=True)
        for case in json.loads((target / "splits_final.json").read_text())[k]["val"]:
            shutil.copy(target / "labelsTr" / f"{case}.nii.gz", folder / "validation")
    scores = nnunet_data.score(work)
    metrics = scores.headline
    summary = metrics.summary()
    assert scores.space == "native"
    assert len(metrics) == 5
    assert summary["whole myocardium"]["dice"]["mean"] == pytest.approx(1.0)
    first = discover_cases(phantom)[0]
    mapped = read_volume(work / "predictions" / f"{first.case_id}.nii.gz", is_label=True)
    assert mapped.same_geometry(read_volume(first.label, is_label=True))
    written = json.loads((work / "test" / "summary.json").read_text())  # as test.py writes it
    assert written["space"] == "native" and "whole images" in written["obtained"]
    assert written["settings"]["evaluation"] == "out of fold over 5 folds"
    assert len(written["cases"]) == 5
    # A second trainer's results beside the first: which one to score is not guessed.
    other = work / "nnUNet_results" / "Dataset501_MyoPS" / "U__P__2d" / "fold_0" / "validation"
    other.mkdir(parents=True)
    shutil.copy(target / "labelsTr" / f"{first.case_id}.nii.gz", other)
    with pytest.raises(ValueError, match="predicted twice"):
        nnunet_data.score(work)


def test_nnunet_missing_is_one_clear_error(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_nnunet(name, *args, **kwargs):
        if name.startswith("nnunetv2"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_nnunet)
    assert nnunet.main(["train", "--work", str(tmp_path), "--fold", "0", "--epochs", "1"]) == 1
