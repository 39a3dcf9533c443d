"""Labels never shape test inputs; native-space scores; test.py and predict.py share one path.

Real MyoPS 2020 cases (oblique slices, 0.73 mm pixels) are preprocessed three times, with the
original label, the label shifted by 12 pixels and the label emptied. The test volumes, and
every prediction made from them, must not move.
"""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

import commands.predict as predict
import commands.test as test_script
from datasets.labels import NUM_CLASSES
from datasets.processed import ProcessedLayout
from datasets.raw import read_volume
from evaluation.evaluate import predict_case
from evaluation.score_folder import main as score_main
from evaluation.score_folder import score_folder
from evaluation.test_cases import read_test_case
from networks.variants import create_network, network_record
from prediction.pipeline import PredictConfig, predict_stacks
from preprocessing.pipeline import PreprocessConfig
from preprocessing.runner import RunOptions, run_preprocessing
from tests.prediction.stub_model import LookupModel

CPU = torch.device("cpu")
CASE = "Case3001"


class BrightnessModel(nn.Module):
    """A deterministic stand-in network: "myocardium" where LGE is mid-grey, "scar" where it is
    bright. Enough structure for localisation and registration to run, no training needed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lge = x[:, 1]
        logits = torch.zeros(x.shape[0], NUM_CLASSES, *x.shape[2:])
        logits[:, 0] = 0.2
        logits[:, 1] = 1.0 - 8 * (lge - 0.35).abs()
        logits[:, 2] = 10 * (lge - 0.8)
        return logits


def _variant(source, out, label_change):
    """A MyoPS 2020 case folder whose images are the real ones and whose label is changed."""
    out.mkdir(parents=True)
    for path in (source / CASE).iterdir():
        if path.name.endswith("_gd.nii.gz"):
            image = nib.load(str(path))
            label = np.asanyarray(image.dataobj)
            nib.save(nib.Nifti1Image(label_change(label).astype(label.dtype), image.affine,
                                     image.header), str(out / path.name))
        else:
            (out / path.name).symlink_to(path)
    return out.parent


@pytest.fixture(scope="module")
def roots(myops2020_dir, tmp_path_factory):
    """Processed roots of the same case with its label original, shifted and emptied."""
    base = tmp_path_factory.mktemp("label_free")
    changes = {"original": lambda a: a, "shifted": lambda a: np.roll(a, 12, axis=0),
               "emptied": np.zeros_like}
    config = PreprocessConfig(nonrigid_registration=False, affine_metric="ngf")
    roots = {}
    for name, change in changes.items():
        raw = _variant(myops2020_dir, base / f"raw_{name}" / CASE, change)
        out = base / f"processed_{name}"
        run_preprocessing(raw, out, config, RunOptions(test_every=1, folds=0, qa=False))
        roots[name] = out
    return roots


def test_labels_never_shape_test_inputs(roots):
    stored = {name: ProcessedLayout(root).read_stored_volume(CASE)
              for name, root in roots.items()}
    original = stored["original"]
    assert original.images.shape[-1] == 224  # the whole crop grid, not an ROI
    for name in ("shifted", "emptied"):
        np.testing.assert_array_equal(stored[name].images, original.images)  # bit-identical
        assert not np.array_equal(stored[name].label, original.label)
    # The emptied label cannot make training slices, yet the case is still a test volume.
    manifest = json.loads((roots["emptied"] / "manifests" / f"{CASE}.json").read_text())
    assert manifest["forms"] == ["test_vol"] and manifest["num_slices"] == 0
    assert ProcessedLayout(roots["original"]).scan("train")  # the original label trains
    assert not ProcessedLayout(roots["emptied"]).scan("train")


def test_predictions_do_not_depend_on_the_label(roots):
    """Localisation, registration (affine, NGF as the training data were) and the ROI pass:
    identical grid and native predictions whatever the label says."""
    config = PredictConfig(preprocess=PreprocessConfig(nonrigid_registration=False,
                                                       affine_metric="ngf"), register=True)
    model = BrightnessModel().eval()
    outputs = {}
    for name, root in roots.items():
        case = read_test_case(ProcessedLayout(root), CASE)
        assert not case.roi_given and case.native is not None
        outputs[name] = predict_case(model, case, 128, CPU, ("bSSFP", "LGE", "T2w"), config)
    grid, native = outputs["original"]
    assert grid.any() and native is not None and native.any()
    # Registration did run (the first-pass myocardium guided an NGF fit of both sequences).
    case = read_test_case(ProcessedLayout(roots["original"]), CASE)
    registered = predict_stacks(model, 128, case.stacks, config, CPU).registration
    assert sorted(registered["affine"]) == ["T2w", "bSSFP"]
    for name in ("shifted", "emptied"):
        np.testing.assert_array_equal(outputs[name][0], grid)
        np.testing.assert_array_equal(outputs[name][1], native)


def test_a_perfect_prediction_scores_one_in_native_space(myops2020_dir, tmp_path, capsys):
    """The raw labels themselves, as label maps on the oblique native grids: every group 1.0
    (Case3032 has no scar: both empty counts as 1.0, HD95 0)."""
    cases = ("Case3001", "Case3032")
    raw = tmp_path / "raw"
    for case in cases:
        (raw / case).mkdir(parents=True)
        for path in (myops2020_dir / case).iterdir():
            (raw / case / path.name).symlink_to(path)
    pred = tmp_path / "pred"
    pred.mkdir()
    for case in cases:
        shutil.copy(myops2020_dir / case / f"{case}_gd.nii.gz", pred / f"{case}.nii.gz")
    metrics = score_folder(pred, raw)
    for group, values in metrics.summary().items():
        assert values["dice"]["mean"] == 1.0, group
        assert values["hd95"]["mean"] == 0.0, group
    # One voxel of scar moved to normal myocardium: Dice drops below 1, in native voxels.
    image = nib.load(str(pred / "Case3001.nii.gz"))
    label = np.asanyarray(image.dataobj).copy()
    scar = np.argwhere(label == 2221)
    label[tuple(scar[0])] = 200
    nib.save(nib.Nifti1Image(label, image.affine, image.header), str(pred / "Case3001.nii.gz"))
    rows = {row["case"]: row for row in score_folder(pred, raw).per_case()}
    count = len(scar)
    assert rows["Case3001"]["scar_dice"] == pytest.approx(2 * (count - 1) / (2 * count - 1))
    assert score_main(["--pred", str(pred), "--raw_root", str(raw)]) == 0
    assert "native space" in capsys.readouterr().out
    # A label map on another grid is refused, naming the file.
    other = np.asanyarray(image.dataobj)[:-1]
    nib.save(nib.Nifti1Image(other, image.affine), str(pred / "Case3032.nii.gz"))
    assert score_main(["--pred", str(pred), "--raw_root", str(raw)]) == 1
    assert "Case3032.nii.gz" in capsys.readouterr().err


def test_native_scores_of_a_model_that_knows_the_grid_truth(roots):
    """The native mapping on a real oblique case: a network that returns the label on the grid
    scores close to 1 against the raw label (the rest is the 1 mm grid's resolution)."""
    case = read_test_case(ProcessedLayout(roots["original"]), CASE)
    model = LookupModel(case.stacks.images, case.label, key=1)
    config = PredictConfig(preprocess=PreprocessConfig(affine_registration=False,
                                                       nonrigid_registration=False))
    grid, native = predict_case(model, case, 128, CPU, ("bSSFP", "LGE", "T2w"), config)
    truth = read_volume(case.native.label.source, is_label=True).array
    assert native.shape == truth.shape

    def dice(a, b):
        return 2 * (a & b).sum() / (a.sum() + b.sum())

    assert dice(grid > 0, case.label > 0) == 1.0  # found the heart, placed the ROI right
    assert dice(native > 0, truth > 0) > 0.9
    assert dice(native == 2, truth == 2) > 0.8


def _checkpoint(path, root):
    torch.manual_seed(0)
    model = create_network("transunet", backbone="tiny", img_size=128).eval()
    torch.save({"network": network_record(model), "model": model.state_dict(),
                "train_config": {"root_path": str(root)},
                "preprocess": PreprocessConfig(nonrigid_registration=False,
                                               affine_metric="ngf").to_dict()}, path)
    return path


def test_test_and_predict_give_the_same_native_labels(roots, myops2020_dir, tmp_path):
    root = roots["original"]
    checkpoint = _checkpoint(tmp_path / "model.pth", root)
    out = tmp_path / "test"
    assert test_script.main(["--checkpoint", str(checkpoint), "--device", "cpu",
                             "--save_nifti", "--output_dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["space"] == "native" and summary["native"]["cases"][0]["case"] == CASE
    assert (out / "native_per_case.csv").is_file()
    pred = tmp_path / "predicted"
    assert predict.main(["--checkpoint", str(checkpoint), "--device", "cpu", "--case_dir",
                         str(myops2020_dir / CASE), "--out", str(pred / f"{CASE}.nii.gz")]) == 0
    from_test = nib.load(str(out / "predictions" / f"{CASE}_native_pred.nii.gz"))
    from_predict = nib.load(str(pred / f"{CASE}.nii.gz"))
    np.testing.assert_array_equal(np.asanyarray(from_test.dataobj),
                                  np.asanyarray(from_predict.dataobj))
    record = json.loads((pred / f"{CASE}.json").read_text())
    assert record["config"]["register"] and "registration" in record["config"]
    # Outputs are never written over: not an existing one, not an input.
    assert predict.main(["--checkpoint", str(checkpoint), "--device", "cpu", "--case_dir",
                         str(myops2020_dir / CASE), "--out", str(pred / f"{CASE}.nii.gz")]) == 1
    lge = pred / "lge.nii.gz"
    shutil.copy(myops2020_dir / CASE / f"{CASE}_LGE.nii.gz", lge)
    before = lge.read_bytes()
    assert predict.main(["--checkpoint", str(checkpoint), "--device", "cpu", "--lge", str(lge),
                         "--out", str(lge), "--overwrite"]) == 1
    assert lge.read_bytes() == before


def test_predict_a_folder_of_cases_and_score_it_in_both_raw_layouts(roots, myops2020_dir,
                                                                     tmp_path, capsys):
    """predict.py --out_dir writes one native label map per case of a raw root; score_folder
    scores them against the raw labels, in the MyoPS 2020 and the MyoPS380 layout alike."""
    cases = ("Case3001", "Case3002")
    myops2020 = tmp_path / "myops2020"
    myops380 = tmp_path / "MyoPS380" / "Raw_data"
    folders = {"C0": "bSSFP", "LGE": "LGE", "T2": "T2w"}
    for case in cases:
        (myops2020 / case).mkdir(parents=True)
        for path in (myops2020_dir / case).iterdir():
            (myops2020 / case / path.name).symlink_to(path)
            code = path.name[len(case) + 1:].split(".")[0]
            folder, name = ((folders[code], f"{case}.nii.gz") if code in folders
                            else ("label", f"{case}_gt.nii.gz"))
            (myops380 / folder).mkdir(parents=True, exist_ok=True)
            (myops380 / folder / name).symlink_to(path)
    checkpoint = _checkpoint(tmp_path / "model.pth", roots["original"])
    scores = {}
    for layout, raw in (("myops2020", myops2020), ("myops380", myops380.parent)):
        out = tmp_path / f"pred_{layout}"
        assert predict.main(["--checkpoint", str(checkpoint), "--device", "cpu",
                             "--case_dir", str(raw), "--out_dir", str(out)]) == 0
        assert sorted(p.name for p in out.glob("*.nii.gz")) == [f"{c}.nii.gz" for c in cases]
        for case in cases:
            written = nib.load(str(out / f"{case}.nii.gz"))
            truth = nib.load(str(myops2020_dir / case / f"{case}_gd.nii.gz"))
            assert written.shape == truth.shape
            np.testing.assert_allclose(written.affine, truth.affine, atol=1e-4)
        scores[layout] = score_folder(out, raw).per_case()
    assert scores["myops2020"] == scores["myops380"]
    assert [row["case"] for row in scores["myops2020"]] == list(cases)
