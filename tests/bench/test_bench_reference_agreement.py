"""bench_reference_agreement splits real offsets per sequence and refuses bad arguments."""

from __future__ import annotations

import json

from bench.bench_reference_agreement import main


def test_reports_both_moving_sequences_of_real_cases(myops2020_dir, capsys):
    assert main(["--real_root", str(myops2020_dir), "--cases", "2", "--bootstrap", "20"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cases"] == 2 and report["reference"] == "LGE"
    assert set(report["heart_centre"]) == set(report["myocardium"]) == {"bSSFP", "T2w"}
    for name, split in report["heart_centre"].items():
        assert report["myocardium"][name]["slices"] == split["slices"] >= 2
    for split in [*report["heart_centre"].values(), *report["myocardium"].values()]:
        assert set(split["own_rms"]) == {"NGF to image", "NGF to label", "MI to image"}
        assert len(split["pair_common"]) == 3
        low, high = split["common_interval"]
        assert 0 <= low <= high
        # What all metrics share cannot exceed what the noisiest of them finds in all.
        assert split["common"] <= max(split["rms_offset"].values())


def test_bad_arguments_exit_1(tmp_path, capsys):
    assert main(["--cases", "0"]) == 1
    assert main(["--real_root", str(tmp_path / "absent")]) == 1
    assert "absent" in capsys.readouterr().err
