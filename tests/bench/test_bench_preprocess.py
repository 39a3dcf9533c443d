"""bench_preprocess runs the real pipeline and reports what it timed."""

from __future__ import annotations

import json

from bench.bench_preprocess import main


def test_reports_every_case_of_a_phantom_run(capsys):
    assert main(["--cases", "2", "--no_nonrigid", "--no_qa"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cases"] == 2 and report["slices"] > 0
    per_case = report["seconds_per_case"]
    assert 0 < per_case["median"] <= per_case["max"] and per_case["mean"] <= per_case["max"]
    assert report["steps"]["affine"] and not report["steps"]["nonrigid"]
    assert report["wall_seconds"] >= per_case["mean"]
    assert report["meets_target"] == (per_case["mean"] < report["target_seconds_per_case"])


def test_bad_arguments_exit_1(tmp_path, capsys):
    assert main(["--cases", "0"]) == 1
    assert main(["--raw_root", str(tmp_path / "absent")]) == 1
    assert "absent" in capsys.readouterr().err
