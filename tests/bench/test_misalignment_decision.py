"""The pre-registered rule for issue 17's default, on bench results with known values."""

from __future__ import annotations

import json

import pytest

from bench import misalignment_decision as decision
from datasets.labels import EVAL_GROUPS

REFERENCE_ALIGNED = [77.0, 54.0, 31.0, 63.0, 88.0]


def _write(folder, model, aligned, sequence_loss, slice_loss, cases=30):
    for draw, loss in (("sequence", sequence_loss), ("slice", slice_loss)):
        losses = {"misaligned": dict.fromkeys(EVAL_GROUPS, 9.0),
                  "misaligned + affine": dict(zip(EVAL_GROUPS, loss, strict=True))}
        bench = {"cases": cases, "per": draw, "strength": 1.0, "groups": list(EVAL_GROUPS),
                 "dice_percent": {"aligned": dict(zip(EVAL_GROUPS, aligned, strict=True))},
                 "loss_vs_aligned": losses}
        (folder / f"{model}_{draw}.json").write_text(json.dumps(bench))


@pytest.fixture
def folder(tmp_path):
    _write(tmp_path, "immseg", REFERENCE_ALIGNED, [3.0] * 5, [4.0] * 5)
    return tmp_path


def test_the_passing_candidate_with_the_higher_aligned_scar_edema_wins(folder):
    # within every margin (0.5 / 1 / 1.5 / 0.5 / 0.5 below), lower losses in both draws
    _write(folder, "good", [76.5, 53.0, 29.5, 62.5, 87.5], [1.0] * 5, [2.0] * 5)
    _write(folder, "better", [77.0, 54.0, 31.0, 63.0, 88.0], [0.5] * 5, [0.9] * 5)
    verdicts, winner, lines = decision.decide(folder, ["immseg", "good", "better"])
    assert [verdict.passes for verdict in verdicts] == [True, True]
    assert winner == "better"
    assert "Decision: better replaces immseg's defaults." in lines
    assert "- better, per sequence, misaligned + affine: met" in lines
    assert "- better, per slice, misaligned: missed in " + ", ".join(EVAL_GROUPS) in lines


def test_each_part_of_the_rule_can_fail_a_candidate(folder, capsys):
    # whole myocardium 1.2 below (limit 1), edema alone 2.5 below (limit 2)
    _write(folder, "drops", [77.0, 54.0, 28.5, 63.0, 86.8], [1.0] * 5, [2.0] * 5)
    # aligned as the reference, but per slice it loses as much on scar (4.0, not less)
    _write(folder, "slice_equal", REFERENCE_ALIGNED, [1.0] * 5, [2.0, 4.0, 2.0, 2.0, 2.0])
    verdicts, winner, _ = decision.decide(folder, ["immseg", "drops", "slice_equal"])
    assert winner is None
    assert verdicts[0].failures == ["aligned edema alone 2.5 points below (limit 2)",
                                    "aligned whole myocardium 1.2 points below (limit 1)"]
    assert verdicts[1].failures == ["per slice + affine: scar loses 4.0, not less than 4.0"]
    assert decision.main(["--folder", str(folder), "immseg", "drops", "slice_equal"]) == 0
    assert "Decision: no candidate passes; immseg's defaults stay." in capsys.readouterr().out


def test_results_of_other_draws_or_missing_files_are_refused(folder, capsys):
    _write(folder, "six_cases", REFERENCE_ALIGNED, [1.0] * 5, [2.0] * 5, cases=6)
    with pytest.raises(ValueError, match="six_cases_sequence and immseg_sequence differ in cases"):
        decision.decide(folder, ["immseg", "six_cases"])
    assert decision.main(["--folder", str(folder), "immseg", "absent"]) == 1
    assert "absent_sequence.json" in capsys.readouterr().err
