"""The pre-registered rule for issue 20's defaults, on test.py summaries with known values."""

from __future__ import annotations

import json

import pytest

from bench import ablation_decision as decision
from datasets.labels import EVAL_GROUPS

CASES = [f"Case{k}" for k in range(10)]


def _run(tmp_path, label, scar_edema, whole=None):
    """A test.py summary whose cases have the given scar+edema (and whole myocardium) Dice."""
    whole = whole or [0.88] * len(CASES)
    rows = []
    for case, se, wm in zip(CASES, scar_edema, whole, strict=True):
        row = {"case": case} | {f"{group}_dice": 0.7 for group in EVAL_GROUPS}
        rows.append(row | {"scar+edema_dice": se, "whole myocardium_dice": wm})
    folder = tmp_path / label
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps({"cases": rows}))
    return folder


@pytest.fixture
def runs(tmp_path):
    return {
        "immseg": _run(tmp_path, "immseg", [0.60] * 10),
        # level with immseg: the release's part is taken
        "pixel_exchange": _run(tmp_path, "pixel", [0.60] * 10),
        # 2 points lower in every case: ours stays
        "release_schedule": _run(tmp_path, "schedule", [0.58] * 10),
        # 2 points lower on average, but immseg higher in only 5 of 10 cases: release
        "release_contrast": _run(tmp_path, "contrast", [0.55] * 5 + [0.61] * 5),
    }


def test_each_part_is_chosen_by_both_conditions(runs):
    choices, lines = decision.decide(runs)
    assert choices == {"pixel_exchange": "release", "release_schedule": "ours",
                       "release_contrast": "release"}
    assert any("release_schedule against immseg: scar+edema: +2.0 points, higher in 10/10"
               in line and "measurably better in scar+edema" in line for line in lines)
    assert "Chosen: pixel_exchange, release_contrast." in lines


def test_the_whole_myocardium_decides_too(tmp_path):
    runs = {"immseg": _run(tmp_path, "immseg", [0.60] * 10),
            "part": _run(tmp_path, "part", [0.60] * 10, whole=[0.865] * 10)}
    choices, _ = decision.decide(runs)
    assert choices == {"part": "ours"}  # 1.5 points lower in the whole myocardium, 10/10


def test_the_combined_row_is_compared_with_the_chosen_combination(runs, tmp_path):
    combined = ("release_parts", _run(tmp_path, "parts", [0.60] * 10))
    _, lines = decision.decide(runs, combined)
    assert lines[-1] == ("  The chosen combination (pixel_exchange + release_contrast) has no "
                         "run yet: train it to compare.")
    one = {label: runs[label] for label in ("immseg", "pixel_exchange", "release_schedule")}
    _, lines = decision.decide(one, combined)
    assert lines[-2].startswith("- release_parts against immseg:")
    assert lines[-1].startswith("- release_parts against pixel_exchange:")


def test_runs_over_other_cases_are_refused(runs, tmp_path, capsys):
    (runs["pixel_exchange"] / "summary.json").write_text(json.dumps({"cases": []}))
    with pytest.raises(ValueError, match="hold different cases"):
        decision.decide(runs)
    argv = [f"{label}={folder}" for label, folder in runs.items()]
    assert decision.main(argv) == 1
    assert "different cases" in capsys.readouterr().err
