"""Training times read back from trainer logs and nnU-Net budgets."""

from __future__ import annotations

import json

import pytest

from bench.run_times import log_times, main, run_times

LOG = """2026-12-06 10:00:00,000 INFO trainer: training transunet ...
2026-12-06 10:00:10,000 INFO trainer: epoch 1/4: mean loss 0.9, lr 1e-3
2026-12-06 10:00:20,000 INFO trainer: epoch 2/4: mean loss 0.8, lr 1e-3
2026-12-06 10:05:20,000 INFO trainer: epoch 3/4: mean loss 0.7, lr 1e-3
2026-12-06 10:05:30,000 INFO trainer: epoch 4/4: mean loss 0.6, lr 1e-3
2026-12-06 10:05:31,000 INFO trainer: finished in 331.0 s; final checkpoint x
"""


def test_median_epoch_is_robust_to_a_pause(tmp_path):
    (tmp_path / "fold0").mkdir()
    (tmp_path / "fold0" / "log.txt").write_text(LOG)
    times = log_times(tmp_path / "fold0" / "log.txt")
    # Gaps 10, 300 (a pause), 10 s: the median is 10 s, the estimate 4 x 10.
    assert times == {"epochs_logged": 4, "epochs": 4, "wall_s": 331.0, "median_epoch_s": 10.0,
                     "estimate_s": 40.0}
    budget = tmp_path / "nnunet" / "nnUNet_results" / "D" / "T" / "fold_0"
    budget.mkdir(parents=True)
    (budget / "budget.json").write_text(json.dumps({"seconds": 1080.4, "epochs": 3}))
    # Two starts of the fold (killed in its second epoch): epoch times 100, 900 (paused), 120.
    (budget / "training_log_2026_12_6_10_00_00.txt").write_text(
        "2026-12-06 10:00:00.1: Epoch time: 100.00 s\n2026-12-06 10:15:00.1: Epoch 1\n")
    (budget / "training_log_2026_12_6_11_00_00.txt").write_text(
        "2026-12-06 11:15:00.1: Epoch time: 900.50 s\n"
        "2026-12-06 11:17:00.1: Epoch time: 120.00 s\n")
    assert run_times(tmp_path / "nnunet")["folds"]["fold_0"] == {
        "wall_s": 1080.4, "epochs": 3, "median_epoch_s": 120.0, "estimate_s": 360.0}
    assert run_times(tmp_path)["total"] == {"wall_s": 331.0, "estimate_s": 40.0}
    with pytest.raises(ValueError, match="no trainer log"):
        run_times(tmp_path / "fold0" / "absent")
    assert main([str(tmp_path / "empty")]) == 1
