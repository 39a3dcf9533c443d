from __future__ import annotations

import shutil

import pytest

from datasets.raw import RawDataError, read_volume
from prediction.inputs import PatientImages, case_dir_files, load_patient


def test_reference_is_lge_when_given_else_the_sparsest(phantom_files):
    everything = load_patient({name: phantom_files[name] for name in ("bSSFP", "LGE", "T2w")})
    assert everything.case_id == "case0001" and everything.reference == "LGE"
    assert everything.present == ("bSSFP", "LGE", "T2w")
    without_lge = load_patient({"bSSFP": phantom_files["bSSFP"], "LGE": None,
                                "T2w": phantom_files["T2w"]}, case_id="p1")
    assert without_lge.present == ("bSSFP", "T2w") and without_lge.case_id == "p1"
    assert without_lge.reference == "T2w"  # 6-8 slices against bSSFP's 9-12
    assert load_patient({"bSSFP": phantom_files["bSSFP"]}).reference == "bSSFP"


def test_inputs_are_refused_with_the_reason(phantom_files, tmp_path):
    with pytest.raises(ValueError, match="no input sequence"):
        load_patient({"LGE": None})
    with pytest.raises(ValueError, match="unknown sequence"):
        load_patient({"FLAIR": phantom_files["LGE"]})
    with pytest.raises(ValueError, match="no input sequence"):
        PatientImages("x", {})
    with pytest.raises(RawDataError, match=r"absent\.nii\.gz: file not found"):
        load_patient({"LGE": tmp_path / "absent.nii.gz"})


def test_case_dir_in_either_layout(phantom_root, phantom_files, tmp_path):
    case_id, files = case_dir_files(phantom_root)
    assert case_id == "case0001" and files == {name: phantom_files[name]
                                               for name in ("bSSFP", "LGE", "T2w")}
    assert case_dir_files(phantom_root, sequences=("LGE",))[1] == {"LGE": phantom_files["LGE"]}
    # MyoPS 2020: one folder per case, C0 / LGE / T2 (a label is ignored).
    case = tmp_path / "Case0007"
    case.mkdir()
    for name, suffix in (("bSSFP", "C0"), ("LGE", "LGE"), ("T2w", "T2")):
        shutil.copy(phantom_files[name], case / f"Case0007_{suffix}.nii.gz")
    case_id, files = case_dir_files(case)
    assert case_id == "Case0007" and files["bSSFP"].name == "Case0007_C0.nii.gz"
    assert read_volume(files["LGE"]).array.shape == read_volume(phantom_files["LGE"]).array.shape
    shutil.copytree(case, tmp_path / "Case0008")
    for path in (tmp_path / "Case0008").iterdir():
        path.rename(path.with_name(path.name.replace("0007", "0008")))
    with pytest.raises(RawDataError, match="holds 2 cases"):
        case_dir_files(tmp_path)
    assert case_dir_files(tmp_path, "Case0008")[0] == "Case0008"
    with pytest.raises(RawDataError, match="no case 'Case0009'"):
        case_dir_files(tmp_path, "Case0009")
    with pytest.raises(RawDataError, match="not found"):
        case_dir_files(tmp_path / "nothing")


def test_case_dir_with_a_sequence_missing(phantom_files, tmp_path):
    # A MyoPS 2020 folder without its bSSFP (C0): the sequences present are used.
    case = tmp_path / "Case0011"
    case.mkdir()
    for name, suffix in (("LGE", "LGE"), ("T2w", "T2")):
        shutil.copy(phantom_files[name], case / f"Case0011_{suffix}.nii.gz")
    case_id, files = case_dir_files(case)
    assert case_id == "Case0011" and list(files) == ["LGE", "T2w"]
    assert list(case_dir_files(case, sequences=("T2w",))[1]) == ["T2w"]
    with pytest.raises(RawDataError, match=r"Case0011 lacks Case0011_C0\.nii\.gz"):
        case_dir_files(case, sequences=("bSSFP", "LGE"))
