from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest

from datasets.phantom import write_phantom_dataset
from datasets.processed import ProcessedLayout
from datasets.raw import discover_cases, load_case
from preprocessing.pipeline import PreprocessConfig, preprocess_case
from preprocessing.runner import (
    VOXELMORPH_CHECKPOINT,
    RunOptions,
    assign_splits,
    run_preprocessing,
    voxelmorph_provenance,
)
from preprocessing.voxelmorph import checkpoint_provenance, train_voxelmorph
from preprocessing.voxelmorph_net import VoxelMorphConfig
from utils import file_sha256


@pytest.fixture(scope="module")
def real_case(myops2020_dir):
    return load_case(discover_cases(myops2020_dir)[0])


def test_real_case_shapes_ranges_and_roi(real_case):
    processed = preprocess_case(real_case)
    depth = real_case.images["LGE"].num_slices
    for stack in processed.images.values():
        assert stack.shape == (depth, 128, 128)
        assert stack.min() >= 0.0 and stack.max() == pytest.approx(255.0)
    assert processed.label.shape == (depth, 128, 128)
    assert set(np.unique(processed.label)) == {0, 1, 2, 3}
    # The ROI is centred on the myocardium (unless clamped at the 224 crop border).
    _, rows, cols = np.nonzero(processed.label)
    assert rows.mean() == pytest.approx(63.5, abs=1.0)
    assert cols.mean() == pytest.approx(63.5, abs=1.0)
    manifest = processed.manifest
    assert manifest["reference"] == "LGE"
    assert manifest["matched_slices"]["bSSFP"] == list(range(depth))
    assert processed.spacing == pytest.approx((12.0, 1.0, 1.0), abs=1e-3)


def test_label_volume_is_preserved_in_mm(real_case):
    """Myocardium area in mm^2 per slice survives resampling from 0.73 mm to 1 mm pixels."""
    processed = preprocess_case(real_case, PreprocessConfig(roi_size=224))
    _, row_mm, col_mm = real_case.label.spacing
    native = (real_case.label.array > 0).sum(axis=(1, 2)) * row_mm * col_mm
    resampled = (processed.label > 0).sum(axis=(1, 2)).astype(float)
    np.testing.assert_allclose(resampled, native, rtol=0.05)


def test_config_validation():
    with pytest.raises(ValueError, match="roi_size"):
        PreprocessConfig(roi_size=256, crop_size=224)
    with pytest.raises(ValueError, match="pixel_spacing"):
        PreprocessConfig(pixel_spacing_mm=0)


def test_the_release_split_tests_cases_one_and_six():
    """The released code tests filenames[0::5]: case0001, case0006, ... (1-based names)."""
    splits = assign_splits([f"case{i:04d}" for i in range(10, 0, -1)], test_every=5)
    assert [k for k, v in splits.items() if v == "test_vol"] == ["case0001", "case0006"]
    assert set(assign_splits(["a", "b"], 0).values()) == {"train"}
    with pytest.raises(ValueError, match="test_every"):
        assign_splits(["a"], -1)


def test_runner_packs_layout_skips_finished_and_reports_bad_cases(myops2020_dir, tmp_path):
    raw = tmp_path / "raw"
    for case in ("Case3001", "Case3002", "Case3004"):
        shutil.copytree(myops2020_dir / case, raw / case)
    out = tmp_path / "out"
    config = PreprocessConfig(nonrigid_registration=False)
    options = RunOptions(test_every=3, folds=3)
    results = run_preprocessing(raw, out, config, options)
    assert [(r.case_id, r.split, r.skipped) for r in results] == [
        ("Case3001", "test_vol", False), ("Case3002", "train", False),
        ("Case3004", "train", False)]
    layout = ProcessedLayout(out)
    assert layout.names("test_vol") == ["Case3001"]
    train_names = layout.names("train")
    assert len(train_names) == results[1].num_slices + results[2].num_slices
    # Every case is stored in both forms; the test volume is the whole label-free crop grid.
    assert len(layout.scan("train")) == sum(r.num_slices for r in results)
    assert layout.scan("test_vol") == ["Case3001", "Case3002", "Case3004"]
    image, _label, spacing = layout.read_volume("Case3004")
    assert image.shape[1:] == (3, 224, 224) and image.min() >= 0.0 and image.max() <= 1.0
    assert spacing == pytest.approx((12.0, 1.0, 1.0), abs=1e-3)
    for fold, case in enumerate(("Case3001", "Case3002", "Case3004")):
        lists = out / "lists" / "cv3" / f"fold{fold}"
        assert (lists / "test_vol.txt").read_text() == f"{case}\n"
        assert not any(line.startswith(case) for line in
                       (lists / "train.txt").read_text().splitlines())

    assert not (out / ".work").exists()  # parked intermediate results are cleaned up
    assert sorted(p.name for p in (out / "qa").iterdir()) == [
        "Case3001.png", "Case3002.png", "Case3004.png"]
    again = run_preprocessing(raw, out, config, options)
    assert all(r.skipped for r in again)
    # Other settings redo the cases (once); the manifests then record the new ones.
    other = PreprocessConfig(nonrigid_registration=False, affine_registration=False)
    redone = run_preprocessing(raw, out, other, options)
    assert not any(r.skipped for r in redone)
    manifest = json.loads((out / "manifests" / "Case3001.json").read_text())
    assert manifest["config"]["affine_registration"] is False
    assert all(r.skipped for r in run_preprocessing(raw, out, other, options))

    # A corrupt file fails its case only; the others are written again, and the failed case's
    # complete earlier version (untouched: it failed before any rewrite) stays listed.
    before = (out / "manifests" / "Case3002.json").read_text()
    (raw / "Case3002" / "Case3002_T2.nii.gz").write_bytes(b"broken")
    with pytest.raises(RuntimeError, match=r"Case3002: .*Case3002_T2.nii.gz: unreadable"):
        run_preprocessing(raw, out, config, RunOptions(test_every=3, overwrite=True))
    assert layout.names("test_vol") == ["Case3001"]
    assert {name.split("_")[0] for name in layout.names("train")} == {"Case3002", "Case3004"}
    assert (out / "manifests" / "Case3002.json").read_text() == before


def test_voxelmorph_checkpoint_is_reused_only_with_its_training_settings(tmp_path, caplog):
    raw, out = tmp_path / "raw", tmp_path / "out"
    write_phantom_dataset(raw, 2, seed=3)
    config = PreprocessConfig(affine_registration=False)
    tiny = VoxelMorphConfig(encoder_channels=(4, 4), decoder_channels=(4,), iterations=3,
                            batch_size=2)
    options = RunOptions(test_every=0, qa=False, voxelmorph=tiny)
    checkpoint = out / VOXELMORPH_CHECKPOINT

    def network_of_cases() -> set[str]:
        return {json.loads(path.read_text())["voxelmorph_sha256"]
                for path in (out / "manifests").glob("*.json")}

    # A checkpoint that records no settings (written before they were recorded) is replaced.
    bare = [(np.full((16, 16), 100.0), np.full((16, 16), 50.0), None)] * 2
    train_voxelmorph(bare, tiny, "cpu", checkpoint_path=checkpoint, progress=False)
    stale = file_sha256(checkpoint)
    with caplog.at_level(logging.INFO, logger="preprocessing.runner"):
        run_preprocessing(raw, out, config, options)
    assert "no recorded settings" in caplog.text
    first = file_sha256(checkpoint)
    assert first != stale
    assert checkpoint_provenance(checkpoint) == voxelmorph_provenance(config, options)
    assert network_of_cases() == {first}
    assert all(r.skipped for r in run_preprocessing(raw, out, config, options))
    assert file_sha256(checkpoint) == first

    # Pairs made with other settings: the network is trained again and every case redone.
    other = replace(config, high_percentile=99.0)
    with caplog.at_level(logging.INFO, logger="preprocessing.runner"):
        assert not any(r.skipped for r in run_preprocessing(raw, out, other, options))
    assert "preprocess.high_percentile" in caplog.text
    second = file_sha256(checkpoint)
    assert second != first and network_of_cases() == {second}
    assert checkpoint_provenance(checkpoint)["preprocess"]["high_percentile"] == 99.0
    # So do other network settings.
    longer = replace(options, voxelmorph=replace(tiny, iterations=4))
    assert not any(r.skipped for r in run_preprocessing(raw, out, other, longer))
    third = file_sha256(checkpoint)
    assert third != second and network_of_cases() == {third}

    # A checkpoint the user names is reused as asked, with a warning, and nothing is redone.
    caplog.clear()
    named = replace(options, voxelmorph_checkpoint=checkpoint)
    assert all(r.skipped for r in run_preprocessing(raw, out, other, named))
    assert "as asked" in caplog.text and "voxelmorph.iterations" in caplog.text
    assert file_sha256(checkpoint) == third
    # Without the non-rigid step the cases are redone and record no network.
    assert not any(r.skipped for r in run_preprocessing(
        raw, out, replace(other, nonrigid_registration=False), options))
    assert network_of_cases() == {None}


def test_reruns_follow_the_raw_files_and_a_failed_overwrite_keeps_the_lists(myops2020_dir,
                                                                            tmp_path):
    """Reruns used to compare settings only: a corrected raw file was "skipped as finished",
    and a failed --overwrite run emptied train.txt although the old files were intact."""
    raw = tmp_path / "raw"
    for case in ("Case3001", "Case3002"):
        shutil.copytree(myops2020_dir / case, raw / case)
    out = tmp_path / "out"
    config = PreprocessConfig(affine_registration=False, nonrigid_registration=False)
    options = RunOptions(test_every=0, folds=0, qa=False)
    run_preprocessing(raw, out, config, options)
    listed = (out / "lists" / "train.txt").read_text()
    assert listed.count("Case3001_slice") and listed.count("Case3002_slice")
    # A corrected T2 of one case: that case is done again, the other is not.
    t2 = raw / "Case3002" / "Case3002_T2.nii.gz"
    image = nib.load(str(t2))
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj) * 2, image.affine, image.header),
             str(t2))
    again = {r.case_id: r.skipped for r in run_preprocessing(raw, out, config, options)}
    assert again == {"Case3001": True, "Case3002": False}
    manifest = json.loads((out / "manifests" / "Case3002.json").read_text())
    assert manifest["sources_sha256"]["T2w"] == file_sha256(t2)
    # A rewrite removes the case's old slices first (a stale extra slice would otherwise train).
    stale = out / "LGE" / "train_npz" / "Case3001_slice042.npz"
    shutil.copy(next((out / "LGE" / "train_npz").glob("Case3001_slice000.npz")), stale)
    run_preprocessing(raw, out, config, RunOptions(test_every=0, folds=0, qa=False,
                                                   overwrite=True))
    assert not stale.exists()
    # Every case fails under --overwrite: the complete earlier versions stay listed.
    for case in ("Case3001", "Case3002"):
        (raw / case / f"{case}_LGE.nii.gz").write_bytes(b"broken")
    with pytest.raises(RuntimeError, match="2 of 2 cases failed"):
        run_preprocessing(raw, out, config, RunOptions(test_every=0, folds=0, qa=False,
                                                       overwrite=True))
    assert (out / "lists" / "train.txt").read_text() == listed
