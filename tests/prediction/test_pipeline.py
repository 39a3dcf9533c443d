"""The whole prediction path with a network that knows the answer: only geometry can go wrong."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from datasets.labels import MODALITIES
from datasets.raw import read_volume
from prediction.inputs import load_patient
from prediction.pipeline import (
    PredictConfig,
    output_paths,
    predict_patient,
    preprocess_config_for,
    write_prediction,
)
from preprocessing.affine_registration import AffineRegistrationConfig
from preprocessing.pipeline import PreprocessConfig, grid_stacks, roi_origin
from preprocessing.resample import sample_slice
from preprocessing.transforms import Affine2D, identity_field
from tests.helpers import write_nifti
from tests.prediction.stub_model import LookupModel

CPU = torch.device("cpu")
TRUTH_KEY = {"LGE": "label", "T2w": "truth_T2w", "bSSFP": "truth_bSSFP"}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def run_stub(files, sequences, config: PredictConfig | None = None):
    """Predict ``sequences`` of a case with a :class:`LookupModel` that knows its truth.

    The truth is put on the crop grids the pipeline builds (nearest neighbour), which is also
    what :func:`preprocessing.pipeline.align_case` does with a training label.
    """
    config = config or PredictConfig()
    patient = load_patient({name: files[name] for name in sequences})
    truth = read_volume(files[TRUTH_KEY[patient.reference]], is_label=True)
    stacks = grid_stacks(patient.case_id, patient.volumes, config.preprocess)
    labels = np.stack([sample_slice(truth, k, grid, is_label=True)
                       for k, grid in zip(stacks.kept, stacks.grids, strict=True)])
    model = LookupModel(stacks.images, labels, key=MODALITIES.index(patient.reference))
    prediction = predict_patient(model, config.preprocess.roi_size, patient, config, CPU)
    return prediction, truth, labels, model, stacks


@pytest.fixture(scope="module")
def off_centre(off_centre_files):
    return run_stub(off_centre_files, MODALITIES)


def test_heart_is_found_off_centre(off_centre):
    prediction, truth, labels, model, stacks = off_centre
    grid = stacks.grids[0]
    z, y, x = np.nonzero(truth.array > 0)
    world = (truth.affine @ np.stack([x, y, z, np.ones_like(x)]))[:3].T
    true_rc = np.stack([(world - grid.origin) @ grid.row_axis,
                        (world - grid.origin) @ grid.col_axis]).mean(axis=1) / grid.spacing
    grid_centre = (grid.size - 1) / 2
    assert np.hypot(*(true_rc - grid_centre)) > 30.0  # mm: the heart is far off-centre
    heart = prediction.record["heart"]
    assert heart["found"]
    assert np.hypot(*(np.array(heart["centre"]) - true_rc)) < 2.0  # mm
    # The ROI is exactly the one preprocessing would have cut around the label.
    assert heart["origin"] == roi_origin(labels, 128, "case")
    # 3 x 3 localisation windows of 128 at stride 48 on every slice, then the ROI once per slice.
    depth = len(stacks.kept)
    windows = [(r, c) for _, r, c, _ in model.seen]
    assert sorted(set(windows[:9 * depth])) == [(r, c) for r in (0, 48, 96) for c in (0, 48, 96)]
    assert windows[9 * depth:] == [tuple(heart["origin"])] * depth


def test_native_labels_reproduce_the_truth(off_centre):
    prediction, truth, *_ = off_centre
    assert prediction.labels.shape == truth.array.shape
    assert dice(prediction.labels > 0, truth.array > 0) > 0.97
    for label in (1, 2, 3):
        assert dice(prediction.labels == label, truth.array == label) > 0.9
    np.testing.assert_allclose(prediction.probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_written_label_map_has_the_lge_geometry(off_centre, off_centre_files, tmp_path):
    prediction = off_centre[0]
    written = write_prediction(prediction, tmp_path / "out" / "pred.nii.gz",
                               save_probabilities=True)
    lge = nib.load(str(off_centre_files["LGE"]))
    image = nib.load(str(written["labels"]))
    assert image.shape == lge.shape
    np.testing.assert_allclose(image.affine, lge.affine, atol=1e-5)
    assert image.get_data_dtype() == np.uint8
    assert int(image.header["sform_code"]) == 1 and int(image.header["qform_code"]) == 1
    np.testing.assert_array_equal(np.asanyarray(image.dataobj),
                                  prediction.labels.transpose(2, 1, 0))
    probabilities = nib.load(str(written["probabilities"]))
    assert probabilities.shape == (*lge.shape, 4)
    assert probabilities.get_data_dtype() == np.float32
    np.testing.assert_array_equal(np.asanyarray(probabilities.dataobj).argmax(axis=3),
                                  np.asanyarray(image.dataobj))
    record = json.loads(written["record"].read_text())
    assert record["reference"] == "LGE" and record["output_shape_xyz"] == list(lge.shape)
    assert record["roi"]["row0"] == prediction.record["heart"]["origin"][0]
    assert record["reference_slices_used"] == list(range(lge.shape[2]))
    assert record["outputs"]["labels"] == str(written["labels"])
    # Volumes and burdens of the written map, counted here from its voxels and the LGE's zooms.
    stored = np.asanyarray(image.dataobj)
    voxel_ml = float(np.prod(lge.header.get_zooms()[:3])) / 1000
    scar, whole = (np.count_nonzero(stored == 2) * voxel_ml,
                   np.count_nonzero(stored > 0) * voxel_ml)
    assert whole > 0
    assert record["volume_ml"]["scar"] == pytest.approx(scar)
    assert record["group_volume_ml"]["whole myocardium"] == pytest.approx(whole)
    assert record["burden_percent"]["scar burden"] == pytest.approx(100 * scar / whole)
    assert sorted(p.name for p in written["labels"].parent.iterdir()) == [
        "pred.json", "pred.nii.gz", "pred_probabilities.nii.gz"]


@pytest.mark.parametrize("sequences", [("LGE",), ("LGE", "T2w"), ("bSSFP", "T2w")])
def test_sequence_subsets(phantom_files, sequences):
    prediction, truth, _, model, _ = run_stub(phantom_files, sequences)
    reference = "LGE" if "LGE" in sequences else "T2w"  # T2w: fewer slices than bSSFP
    assert prediction.record["reference"] == reference
    assert prediction.record["sequences_present"] == list(sequences)
    assert prediction.labels.shape == read_volume(phantom_files[reference]).array.shape
    assert dice(prediction.labels > 0, truth.array > 0) > 0.95
    inputs = np.concatenate(model.inputs)
    for channel, name in enumerate(MODALITIES):
        assert (inputs[:, channel].max() > 0) == (name in sequences)


def test_reference_slice_without_partner_is_background(phantom_files, tmp_path):
    """A T2w stack missing the slice next to LGE slice 1: that slice is left out, as in
    preprocessing, and comes back as background."""
    lge, t2w = read_volume(phantom_files["LGE"]), read_volume(phantom_files["T2w"])
    distances = np.abs((lge.slice_centres()[1] - t2w.slice_centres()) @ t2w.slice_normal)
    partner = int(distances.argmin())
    assert partner > 0
    # Drop the partner slice and every one beyond it, so the stack stays evenly spaced.
    files = dict(phantom_files, T2w=write_nifti(tmp_path / "t2w.nii.gz",
                                                t2w.array[:partner], t2w.affine))
    prediction, truth, *_ = run_stub(files, ("LGE", "T2w"))
    used = prediction.record["reference_slices_used"]
    assert 1 not in used and 1 in prediction.record["reference_slices_dropped"]
    assert not prediction.labels[1].any()
    assert (prediction.probabilities[1, 0] == 1.0).all()
    assert dice(prediction.labels[used] > 0, truth.array[used] > 0) > 0.95


def test_registration_with_predicted_mask_aligns_t2w(phantom_files):
    """--register: the first-pass myocardium guides the affine fit, which brings the phantom's
    misaligned T2w truth closer to the LGE truth than no registration does."""
    prediction, truth, labels, _, stacks = run_stub(phantom_files, MODALITIES,
                                                    PredictConfig(register=True))
    records = prediction.record["registration"]["affine"]
    assert sorted(records) == ["T2w", "bSSFP"]
    assert prediction.record["registration"]["fixed"] == "LGE"
    origin = tuple(prediction.record["heart"]["origin"])
    roi_field = identity_field((128, 128)) + np.array(origin, np.float64)[:, None, None]
    t2w_truth = read_volume(phantom_files["truth_T2w"], is_label=True)
    roi_truth = labels[:, origin[0]:origin[0] + 128, origin[1]:origin[1] + 128] > 0
    before, after = [], []
    for i, grid in enumerate(stacks.grids):
        partner = stacks.partners["T2w"][i]
        transform = Affine2D.from_dict(records["T2w"][i]["transform"])
        for fields, scores in ((roi_field, before), (transform.map_field(roi_field), after)):
            moved = sample_slice(t2w_truth, partner, grid, is_label=True, field=fields) > 0
            scores.append(dice(moved, roi_truth[i]))
    assert np.mean(after) > np.mean(before)
    assert dice(prediction.labels > 0, truth.array > 0) > 0.97


def test_predict_config_validation():
    for change in ({"stride": 0}, {"weighting": "median"}, {"min_evidence": 0.0},
                   {"batch_size": 0}, {"preprocess": {"roi_size": 128}}):
        with pytest.raises(ValueError):
            PredictConfig(**change)
    record = PredictConfig().to_dict()
    assert record["geometry"]["roi_size"] == 128 and "registration" not in record
    assert "affine" in PredictConfig(register=True).to_dict()["registration"]


def test_output_paths():
    paths = output_paths("out/pred.nii.gz")
    assert [str(p) for p in paths.values()] == [
        "out/pred.nii.gz", "out/pred.json", "out/pred_probabilities.nii.gz"]
    assert output_paths("p.nii")["probabilities"].name == "p_probabilities.nii"
    for bad in ("pred.png", "pred", ".nii.gz"):
        with pytest.raises(ValueError, match="nii"):
            output_paths(bad)


def test_preprocess_config_from_training_manifests(tmp_path):
    manifests = tmp_path / "data" / "manifests"
    manifests.mkdir(parents=True)
    recorded = PreprocessConfig(roi_size=96, low_percentile=1.0,
                                pixel_spacing_mm=1.25,
                                affine=AffineRegistrationConfig(pixel_spacing_mm=1.25))
    (manifests / "case0001.json").write_text(json.dumps({"config": recorded.to_dict()}))
    payload = {"train_config": {"root_path": str(tmp_path / "data")}}
    config, source = preprocess_config_for(payload)
    assert source.endswith("manifests")
    assert (config.roi_size, config.low_percentile, config.pixel_spacing_mm) == (96, 1.0, 1.25)
    assert config.affine.pixel_spacing_mm == 1.25
    config, _ = preprocess_config_for(payload, {"roi_size": 112, "crop_size": None})
    assert (config.roi_size, config.crop_size) == (112, 224)
    assert preprocess_config_for({})[1] == "defaults"
    with pytest.raises(ValueError, match="roi_size"):
        preprocess_config_for({}, {"roi_size": 300})
    # The checkpoint's own record wins over the manifests (which may have moved or changed).
    stored = PreprocessConfig(roi_size=112).to_dict()
    config, source = preprocess_config_for(payload | {"preprocess": stored})
    assert (source, config.roi_size, config.pixel_spacing_mm) == ("checkpoint", 112, 1.0)


def test_the_affine_pooling_comes_from_the_training_data_unless_a_flag_says_otherwise(tmp_path):
    import argparse

    from commands.options import add_prediction_arguments, predict_config

    parser = argparse.ArgumentParser()
    add_prediction_arguments(parser)
    stored = {"preprocess": PreprocessConfig(affine_pooling="stack").to_dict()}
    config, _ = predict_config(parser.parse_args([]), stored)
    assert config.preprocess.affine_pooling == "stack"
    assert config.to_dict()["geometry"]["affine_pooling"] == "stack"
    config, _ = predict_config(parser.parse_args(["--affine_pooling", "shrink"]), stored)
    assert config.preprocess.affine_pooling == "shrink"
    config, _ = predict_config(parser.parse_args([]), {})
    assert config.preprocess.affine_pooling == "slice"
    with pytest.raises(SystemExit):
        parser.parse_args(["--affine_pooling", "mean"])


def test_a_failed_write_leaves_the_previous_outputs_whole(off_centre, tmp_path, monkeypatch):
    """A full disk used to delete the old JSON record before the new write failed."""
    import errno

    import prediction.pipeline as pipeline

    prediction = off_centre[0]
    out = tmp_path / "pred.nii.gz"
    written = write_prediction(prediction, out, save_probabilities=True)
    before = {key: path.read_bytes() for key, path in written.items()}

    class FullDisk:
        def __init__(self, *args):
            pass

        def to_filename(self, name):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipeline, "nifti_image", FullDisk)
    with pytest.raises(OSError, match="No space left"):
        write_prediction(prediction, out, save_probabilities=True)
    assert {key: path.read_bytes() for key, path in written.items()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "pred.json", "pred.nii.gz", "pred_probabilities.nii.gz"]  # no temporaries left
