"""predict.py end to end with a real (random, tiny) checkpoint, and its refusals."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

import commands.predict as predict
from networks.checkpoint import CHECKPOINT_FINAL, save_training_checkpoint
from networks.variants import create_network


def save_checkpoint(path, variant="transunet", **kwargs):
    """A checkpoint written exactly as trainer.py writes one, around an untrained network."""
    torch.manual_seed(0)
    model = create_network(variant, backbone="tiny", img_size=32, **kwargs)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    save_training_checkpoint(path, model=model, optimizer=optimizer,
                             scaler=torch.amp.GradScaler("cpu", enabled=False), epoch=1,
                             iteration=1, train_config={"model": variant}, schedule={})
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    save_checkpoint(run / CHECKPOINT_FINAL)
    return run


def sequence_args(files, names=("bSSFP", "LGE", "T2w")):
    flags = {"bSSFP": "--bssfp", "LGE": "--lge", "T2w": "--t2w"}
    return [arg for name in names for arg in (flags[name], str(files[name]))]


def test_predict_writes_a_label_map_on_the_lge_grid(run_dir, phantom_files, tmp_path, capsys):
    out = tmp_path / "out" / "pred.nii.gz"
    code = predict.main(["--checkpoint", str(run_dir / CHECKPOINT_FINAL), *sequence_args(
        phantom_files), "--out", str(out), "--save_probabilities", "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "case0001: bSSFP, LGE, T2w ->" in printed
    lge = nib.load(str(phantom_files["LGE"]))
    image = nib.load(str(out))
    assert image.shape == lge.shape
    np.testing.assert_allclose(image.affine, lge.affine, atol=1e-5)
    assert image.get_data_dtype() == np.uint8
    labels = np.asanyarray(image.dataobj)
    assert labels.min() >= 0 and labels.max() <= 3
    probabilities = np.asanyarray(nib.load(str(tmp_path / "out" / "pred_probabilities.nii.gz"))
                                  .dataobj)
    assert probabilities.shape == (*lge.shape, 4)
    np.testing.assert_allclose(probabilities.sum(axis=3), 1.0, atol=1e-5)
    record = json.loads((tmp_path / "out" / "pred.json").read_text())
    assert record["reference"] == "LGE" and record["sequences_absent"] == []
    assert record["roi"]["size"] == 128 and len(record["grids"]) == lge.shape[2]
    assert set(record["heart"]) >= {"centre", "centre_world_mm", "origin", "found"}
    # The report line carries the record's volumes and burden.
    volumes = record["group_volume_ml"]
    assert f"whole myocardium {volumes['whole myocardium']:.1f} mL; scar " \
           f"{volumes['scar']:.1f} mL" in printed


def test_predict_from_a_case_dir_with_a_subset(run_dir, phantom_root, phantom_files, tmp_path):
    out = tmp_path / "subset.nii"
    assert predict.main(["--run_dir", str(run_dir), "--case_dir", str(phantom_root),
                         "--sequences", "t2w,bssfp", "--out", str(out), "--device", "cpu",
                         "--weighting", "uniform", "--stride", "96"]) == 0
    t2w = nib.load(str(phantom_files["T2w"]))
    image = nib.load(str(out))
    assert image.shape == t2w.shape  # no LGE: the sparsest sequence is the reference
    np.testing.assert_allclose(image.affine, t2w.affine, atol=1e-5)
    record = json.loads((tmp_path / "subset.json").read_text())
    assert record["sequences_present"] == ["bSSFP", "T2w"] and record["reference"] == "T2w"
    assert record["config"]["weighting"] == "uniform"


def test_one_frame_of_a_4d_cine(run_dir, phantom_files, tmp_path, capsys):
    """The bSSFP given as a 3-frame series predicts as its chosen frame given alone."""
    bssfp = nib.load(str(phantom_files["bSSFP"]))
    frame = np.asanyarray(bssfp.dataobj).astype(np.float32)
    cine = tmp_path / "cine.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([frame[::-1], frame, frame * 0.5], axis=3), bssfp.affine),
             str(cine))
    common = ["--checkpoint", str(run_dir / CHECKPOINT_FINAL), "--device", "cpu",
              *sequence_args(phantom_files, ("LGE", "T2w"))]
    runs = {"single": ["--bssfp", str(phantom_files["bSSFP"])],
            "frame0": ["--bssfp", str(cine), "--cine_frame", "0"],
            "frame1": ["--bssfp", str(cine), "--cine_frame", "1"]}
    for name, args in runs.items():
        assert predict.main([*common, *args, "--out", str(tmp_path / f"{name}.nii.gz"),
                             "--save_probabilities"]) == 0
    single, frame0, frame1 = (np.asanyarray(nib.load(str(tmp_path / f"{name}_probabilities"
                                                         f".nii.gz")).dataobj) for name in runs)
    np.testing.assert_array_equal(frame1, single)
    assert np.abs(frame0 - single).max() > 1e-3  # the frame read is the one asked for
    assert json.loads((tmp_path / "frame1.json").read_text())["cine_frame"] == 1
    assert json.loads((tmp_path / "single.json").read_text())["cine_frame"] is None
    capsys.readouterr()
    refused = tmp_path / "refused.nii.gz"
    assert predict.main([*common, "--bssfp", str(cine), "--out", str(refused)]) == 1
    assert f"{cine}: expected a 3D volume" in capsys.readouterr().err
    assert predict.main([*common, "--cine_frame", "0", "--out", str(refused)]) == 1
    assert "no bSSFP file was given" in capsys.readouterr().err
    assert not refused.exists()


def bad_volumes(tmp_path, lge_path):
    lge = nib.load(str(lge_path))
    data = np.asanyarray(lge.dataobj).astype(np.float32)
    nan = data.copy()
    nan[5, 5, 0] = np.nan
    bad = {
        "nan.nii.gz": nib.Nifti1Image(nan, lge.affine),
        "flat.nii.gz": nib.Nifti1Image(data[..., 0], lge.affine),
        "series.nii.gz": nib.Nifti1Image(np.stack([data, data], axis=3), lge.affine),
    }
    for name, image in bad.items():
        nib.save(image, str(tmp_path / name))
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti file")
    return {
        "nan.nii.gz": "1 NaN/Inf voxels",
        "flat.nii.gz": "expected a 3D volume",
        "series.nii.gz": "expected a 3D volume",
        "broken.nii.gz": "unreadable NIfTI",
        "absent.nii.gz": "file not found",
    }


def test_bad_inputs_exit_1_naming_the_file_and_write_nothing(run_dir, phantom_files, tmp_path,
                                                             capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    out_dir = tmp_path / "out"
    out = out_dir / "pred.nii.gz"
    checkpoint = ["--checkpoint", str(run_dir / CHECKPOINT_FINAL), "--device", "cpu"]

    def error_of(args: list[str], target=out) -> str:
        assert predict.main([*args, "--out", str(target)]) == 1
        assert not out_dir.exists() or not any(out_dir.iterdir())
        return capsys.readouterr().err

    for name, problem in bad_volumes(inputs, phantom_files["LGE"]).items():
        message = error_of([*checkpoint, "--lge", str(inputs / name),
                            *sequence_args(phantom_files, ("T2w",))])
        assert f"{inputs / name}: {problem}" in message
    assert "no input sequence given" in error_of(checkpoint)
    assert "--sequences names ['bSSFP']" in error_of(
        [*checkpoint, *sequence_args(phantom_files, ("LGE",)), "--sequences", "bSSFP,LGE"])
    assert "either --case_dir or the sequence files" in error_of(
        [*checkpoint, "--case_dir", str(tmp_path), *sequence_args(phantom_files, ("LGE",))])
    missing = tmp_path / "none.pth"
    assert f"{missing}: checkpoint not found" in error_of(
        ["--checkpoint", str(missing), *sequence_args(phantom_files)])
    bogus = tmp_path / "bogus.pth"
    torch.save({"weights": 1}, bogus)
    assert f"{bogus}: not a checkpoint of this framework" in error_of(
        ["--checkpoint", str(bogus), *sequence_args(phantom_files)])
    single = save_checkpoint(tmp_path / "single.pth", "transunet_single", sequence="LGE")
    assert "reads only LGE, which was not given" in error_of(
        ["--checkpoint", str(single), "--device", "cpu",
         *sequence_args(phantom_files, ("T2w",))])
    assert "must be a .nii.gz or .nii file" in error_of(
        [*checkpoint, *sequence_args(phantom_files)], out_dir / "pred.png")
    assert "no case 'case0042'" in error_of(
        [*checkpoint, "--case_dir", str(phantom_files["LGE"].parents[2]), "--case_id",
         "case0042"])


def test_a_stack_no_other_sequence_meets_is_refused(run_dir, phantom_files, tmp_path, capsys):
    """T2w planned 40 mm away from every LGE slice: no slice can be matched."""
    t2w = nib.load(str(phantom_files["T2w"]))
    affine = t2w.affine.copy()
    affine[:3, 3] += 40.0 * affine[:3, 2] / np.linalg.norm(affine[:3, 2])
    moved = tmp_path / "t2w.nii.gz"
    nib.save(nib.Nifti1Image(np.asanyarray(t2w.dataobj)[..., :2], affine), str(moved))
    out = tmp_path / "out" / "pred.nii.gz"
    assert predict.main(["--run_dir", str(run_dir), "--device", "cpu", "--lge",
                         str(phantom_files["LGE"]), "--t2w", str(moved), "--out",
                         str(out)]) == 1
    assert "has a partner within 5.0 mm" in capsys.readouterr().err
    assert not out.exists()
