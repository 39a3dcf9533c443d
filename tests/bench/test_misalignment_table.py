"""The misalignment benches' markdown table, from JSON files written as the bench writes them."""

from __future__ import annotations

import json

import pytest

from bench.misalignment_table import main, misalignment_table, read_bench

GROUPS = ["myocardium", "scar"]


def bench(aligned: list[float], affine: list[float], cases: int = 6, **extra) -> dict:
    dice = {"aligned": dict(zip(GROUPS, aligned, strict=True)),
            "misaligned + affine": dict(zip(GROUPS, affine, strict=True))}
    return {"cases": cases, "per": "sequence", "strength": 1.0, "groups": GROUPS,
            "dice_percent": dice,
            "loss_vs_aligned": {"misaligned + affine": {
                group: dice["aligned"][group] - dice["misaligned + affine"][group]
                for group in GROUPS}} | extra}


def test_rows_cells_and_absent_conditions(tmp_path, capsys):
    first = bench([73.54, 53.5], [71.6, 46.3], misaligned={"myocardium": 4.2, "scar": 10.25})
    (tmp_path / "a.json").write_text(json.dumps(first))
    (tmp_path / "b.json").write_text(json.dumps(bench([73.5, 49.8], [72.3, 48.2])))
    assert main([f"immseg={tmp_path / 'a.json'}", str(tmp_path / "b.json")]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "Groups: myocardium / scar; 6 cases, per sequence, strength 1.", "",
        "| model | aligned Dice | loss, misaligned + affine | loss, misaligned |",
        "|---|---|---|---|",
        "| immseg | 73.5 / 53.5 | 1.9 / 7.2 | 4.2 / 10.2 |",
        "| b | 73.5 / 49.8 | 1.2 / 1.6 | - |"]
    assert main([str(tmp_path / "a.json"), "--conditions", "misaligned"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "| a | 73.5 / 53.5 | 4.2 / 10.2 |"


def test_draws_that_differ_do_not_compare(tmp_path, capsys):
    with pytest.raises(ValueError, match="cv and fold0 differ in cases"):
        misalignment_table({"fold0": bench([1, 2], [1, 2]), "cv": bench([1, 2], [1, 2], 30)})
    (tmp_path / "bad.json").write_text(json.dumps({"cases": 6}))
    with pytest.raises(ValueError, match=r"bad\.json: not a bench_misalignment result \(no per, "):
        read_bench(tmp_path / "bad.json")
    assert main([str(tmp_path / "bad.json")]) == 1
    assert "not a bench_misalignment result" in capsys.readouterr().err
