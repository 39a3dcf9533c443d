from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from datasets.labels import MODALITIES
from datasets.raw import RawDataError, detect_layout, discover_cases, load_case, read_volume
from tests.helpers import axis_affine, write_nifti


def _myops380_case(root: Path, case_id: str, *, with_label: bool = True) -> None:
    rng = np.random.default_rng(0)
    geometry = {"bSSFP": ((1.172, 1.172, 10.0), (8, 20, 24)), "LGE": ((0.8929, 0.8929, 10.0),
                                                                      (4, 26, 30)),
                "T2w": ((0.8929, 0.8929, 12.0), (5, 26, 30))}
    for name, (spacing, shape) in geometry.items():
        write_nifti(root / "Raw_data" / name / f"{case_id}.nii.gz",
                    rng.random(shape).astype(np.float32), axis_affine(spacing))
    if with_label:
        label = np.zeros(geometry["LGE"][1], dtype=np.int16)
        label[:, 10:14, 10:14] = 200
        label[:, 12, 12] = 2221
        write_nifti(root / "Raw_data" / "label" / f"{case_id}_gt.nii.gz", label,
                    axis_affine(geometry["LGE"][0]))


def test_read_volume_orders_slices_first_and_reports_spacing(tmp_path):
    data = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)  # [Z, Y, X]
    path = write_nifti(tmp_path / "v.nii.gz", data, axis_affine((0.5, 0.7, 9.0), (1, 2, 3)))
    volume = read_volume(path)
    np.testing.assert_array_equal(volume.array, data)
    assert volume.spacing == pytest.approx((9.0, 0.7, 0.5))
    centres = volume.slice_centres()
    np.testing.assert_allclose(centres, [[1 + 1.5 * 0.5, 2 + 1 * 0.7, 3], [1.75, 2.7, 12]])
    np.testing.assert_allclose(volume.slice_normal, [0, 0, 1])


def test_myops380_layout_discovered_and_loaded(tmp_path):
    for case_id in ("case0002", "case0001"):
        _myops380_case(tmp_path, case_id)
    assert detect_layout(tmp_path) == "myops380"
    cases = discover_cases(tmp_path)
    assert [c.case_id for c in cases] == ["case0001", "case0002"]
    case = load_case(cases[0])
    assert set(case.images) == set(MODALITIES)
    assert case.label_modality == "LGE"
    assert sorted(np.unique(case.label.array).tolist()) == [0, 1, 2]


def test_missing_sequence_names_case_and_file(tmp_path):
    _myops380_case(tmp_path, "case0001")
    (tmp_path / "Raw_data" / "T2w" / "case0001.nii.gz").unlink()
    (tmp_path / "Raw_data" / "T2w" / "other.txt").write_text("x")
    with pytest.raises(RawDataError, match=r"case0001 lacks T2w"):
        discover_cases(tmp_path)


def test_label_without_images_and_images_without_label(tmp_path):
    _myops380_case(tmp_path, "case0001", with_label=False)
    with pytest.raises(RawDataError, match="without a label"):
        discover_cases(tmp_path)
    assert discover_cases(tmp_path, require_label=False)[0].label is None
    _myops380_case(tmp_path, "case0001")
    write_nifti(tmp_path / "Raw_data" / "label" / "case0009_gt.nii.gz",
                np.zeros((2, 2, 2), np.int16), axis_affine((1, 1, 1)))
    with pytest.raises(RawDataError, match="labels without images: case0009"):
        discover_cases(tmp_path)


@pytest.mark.parametrize(
    ("array", "message"),
    [(np.zeros((4, 5), np.float32), "expected a 3D volume"),
     (np.zeros((2, 3, 4, 2), np.float32), "expected a 3D volume"),
     (np.full((2, 3, 4), np.nan, np.float32), "24 NaN/Inf voxels")],
)
def test_bad_volumes_raise_naming_file(tmp_path, array, message):
    import nibabel as nib

    path = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))
    with pytest.raises(RawDataError, match=rf"bad\.nii\.gz: {message}"):
        read_volume(path)


def test_one_frame_of_a_4d_series(tmp_path):
    import nibabel as nib

    # A cine of 3 frames as dcm2niix writes it: [X, Y, Z, T], frame t filled with t.
    series = np.stack([np.full((4, 3, 2), t, np.float32) for t in range(3)], axis=3)
    affine = axis_affine((1.25, 1.25, 8.0), (5, 6, 7))
    path = tmp_path / "cine.nii.gz"
    nib.save(nib.Nifti1Image(series, affine), str(path))
    volume = read_volume(path, frame=2)
    assert volume.array.shape == (2, 3, 4) and np.all(volume.array == 2)
    np.testing.assert_allclose(volume.affine, affine)
    assert np.all(read_volume(path, frame=0).array == 0)
    with pytest.raises(RawDataError, match=r"cine\.nii\.gz: expected a 3D volume, got shape "
                                           r"\(4, 3, 2, 3\), a series of 3 frames .*--cine_frame"):
        read_volume(path)
    for frame in (3, -1):
        with pytest.raises(RawDataError, match=rf"has frames 0 to 2, frame {frame} asked"):
            read_volume(path, frame=frame)
    # A 3D volume is its own frame 0; a one-frame series reads without asking.
    flat = write_nifti(tmp_path / "flat.nii.gz", np.ones((2, 3, 4), np.float32), affine)
    assert np.all(read_volume(flat, frame=0).array == 1)
    with pytest.raises(RawDataError, match=r"flat\.nii\.gz: a single frame .*frame 1 asked"):
        read_volume(flat, frame=1)
    single = tmp_path / "single.nii.gz"
    nib.save(nib.Nifti1Image(series[..., 1:2], affine), str(single))
    assert np.all(read_volume(single).array == 1)


def test_unreadable_and_missing_files(tmp_path):
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"not a nifti")
    with pytest.raises(RawDataError, match=r"garbage\.nii\.gz: unreadable"):
        read_volume(garbage)
    with pytest.raises(RawDataError, match="file not found"):
        read_volume(tmp_path / "absent.nii.gz")
    with pytest.raises(RawDataError, match="neither"):
        detect_layout(tmp_path)


def test_unknown_label_values_raise(tmp_path):
    _myops380_case(tmp_path, "case0001")
    label_path = tmp_path / "Raw_data" / "label" / "case0001_gt.nii.gz"
    write_nifti(label_path, np.full((4, 26, 30), 77, np.int16), axis_affine((0.8929, 0.8929, 10)))
    with pytest.raises(ValueError, match=r"case0001_gt.nii.gz: unknown label values \[77\]"):
        load_case(discover_cases(tmp_path)[0])


def test_label_on_no_sequence_grid_raises(tmp_path):
    _myops380_case(tmp_path, "case0001")
    write_nifti(tmp_path / "Raw_data" / "label" / "case0001_gt.nii.gz",
                np.zeros((3, 26, 30), np.int16), axis_affine((0.8929, 0.8929, 10)))
    with pytest.raises(RawDataError, match="matches no sequence"):
        load_case(discover_cases(tmp_path)[0])


def test_real_myops2020_cases(myops2020_dir):
    assert detect_layout(myops2020_dir) == "myops2020"
    cases = discover_cases(myops2020_dir)
    assert len(cases) == 30
    case = load_case(cases[0])
    assert case.case_id == "Case3001"
    assert case.label_modality == "LGE"
    # MyoPS 2020 codes arrive mapped: normal myocardium, scar and edema all present in Case3001.
    assert sorted(np.unique(case.label.array).tolist()) == [0, 1, 2, 3]
    assert case.images["bSSFP"].spacing[1] == pytest.approx(0.729, abs=1e-3)
