"""The prepared GPU checks run end to end (tiny sizes, on the CPU) and write every report."""

from __future__ import annotations

import json
import math

from bench import gpu_checks


def test_quick_checks_write_every_report(tmp_path):
    assert gpu_checks.main(["--out", str(tmp_path), "--device", "cpu", "--quick"]) == 0
    reports = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in (
        "environment", "train_step_amp", "train_step_fp32", "train_step_released",
        "inference", "short_training")}
    assert reports["train_step_fp32"]["amp"] is False
    assert reports["train_step_released"]["model"] == "immseg_released"
    for name in ("train_step_amp", "train_step_fp32", "train_step_released"):
        assert reports[name]["train_step"]["s_per_step"] > 0
    assert all(result["ratio"] > 0 for result in reports["inference"]["results"])
    training = reports["short_training"]
    assert training["iterations"] == 2 and math.isfinite(training["final_loss"])
