from __future__ import annotations

import json

import numpy as np
import pytest

from bench.results_table import main, markdown_table, paired_table
from datasets.labels import EVAL_GROUPS
from evaluation.metrics import MetricAccumulator


def _summary_dir(tmp_path, name, predictions):
    """A folder with the summary.json test.py writes, from real metric accumulation."""
    metrics = MetricAccumulator()
    truth = np.zeros((1, 8, 8), np.uint8)
    truth[0, 2:6, 2:6] = 1
    for case, prediction in predictions.items():
        metrics.update(case, prediction, truth, (1.0, 1.0, 1.0))
    folder = tmp_path / name / "test"
    folder.mkdir(parents=True)
    metrics.write_json(folder / "summary.json")
    return folder


def test_table_holds_the_accumulated_means(tmp_path, capsys):
    perfect = np.zeros((1, 8, 8), np.uint8)
    perfect[0, 2:6, 2:6] = 1
    half = np.zeros((1, 8, 8), np.uint8)
    half[0, 2:6, 2:4] = 1  # 8 of 16 pixels: Dice 2*8/(8+16) = 2/3
    a = _summary_dir(tmp_path, "a", {"c1": perfect, "c2": half})
    b = _summary_dir(tmp_path, "b", {"c1": perfect})
    assert main([f"immseg={a}", str(b)]) == 0
    out = capsys.readouterr().out
    myocardium = 100 * (1 + 2 / 3) / 2
    spread = 100 * (1 - 2 / 3) / 2
    # The runs hold different cases (c1, c2 against c1): the labels say how many.
    row = next(line for line in out.splitlines() if line.startswith("| immseg (2 cases) |"))
    assert f"{myocardium:.2f} ± {spread:.2f}" in row
    assert any(line.startswith("| b (1 case) |") and "100.00 ± 0.00" in line
               for line in out.splitlines())
    # A summary that does not list its cases gives no count: the labels stay as given.
    unlisted = tmp_path / "unlisted"
    unlisted.mkdir()
    payload = json.loads((b / "summary.json").read_text())
    del payload["cases"]
    (unlisted / "summary.json").write_text(json.dumps(payload))
    assert main([f"immseg={a}", f"c={unlisted}"]) == 0
    rows = [line.split("|")[1].strip() for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ")]
    assert {"immseg", "c"} <= set(rows) and not any("case" in row for row in rows)
    assert "| HD95 mm |" in out


def test_bad_inputs(tmp_path, capsys):
    (tmp_path / "summary.json").write_text(json.dumps({"nothing": 1}))
    assert main([str(tmp_path)]) == 1
    assert "summary.json" in capsys.readouterr().err
    assert main([str(tmp_path / "absent")]) == 1
    assert main([f"={tmp_path}"]) == 1
    assert "empty label" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no runs"):
        markdown_table({}, "dice")


def test_columns_follow_the_evaluation_groups(tmp_path, capsys):
    truth = np.zeros((1, 8, 8), np.uint8)
    folder = _summary_dir(tmp_path, "a", {"c1": truth})
    assert main([str(folder)]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    columns = [cell.strip() for cell in header.strip("|").split("|")][1:]
    assert columns == list(EVAL_GROUPS)


def test_paired_counts_cases_case_by_case(tmp_path, capsys):
    perfect = np.zeros((1, 8, 8), np.uint8)
    perfect[0, 2:6, 2:6] = 1
    half = np.zeros((1, 8, 8), np.uint8)
    half[0, 2:6, 2:4] = 1
    a = _summary_dir(tmp_path, "a", {"c1": perfect, "c2": half, "c3": perfect})
    b = _summary_dir(tmp_path, "b", {"c1": half, "c2": perfect, "c3": half})
    assert main([f"a={a}", f"b={b}", "--paired", "a"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines()
               if line.startswith("| vs b |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")][1:]
    # Myocardium: a higher in c1 and c3; scar and edema are empty everywhere: all tied.
    assert cells[list(EVAL_GROUPS).index("myocardium")] == "2/3"
    assert cells[list(EVAL_GROUPS).index("scar")] == "0/3 (3 tied)"
    assert main([f"a={a}", f"b={b}", "--paired", "c"]) == 1
    assert "not one of the runs" in capsys.readouterr().err
    assert main([f"a={a}", "--paired", "a"]) == 1
    assert "at least one other run" in capsys.readouterr().err
    with pytest.raises(ValueError, match="different cases"):
        paired_table("a", {"a": {"c1": {}, "c2": {}}, "d": {"c1": {}}})


def test_fold_spread_averages_each_folds_cases_first(tmp_path, capsys):
    perfect = np.zeros((1, 8, 8), np.uint8)
    perfect[0, 2:6, 2:6] = 1
    half = np.zeros((1, 8, 8), np.uint8)
    half[0, 2:6, 2:4] = 1  # Dice 2/3
    # Two folds deal sorted cases round-robin: fold 0 = c1, c3; fold 1 = c2, c4.
    a = _summary_dir(tmp_path, "a", {"c1": perfect, "c2": half, "c3": perfect, "c4": perfect})
    assert main([f"a={a}", "--folds", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if "over 2 fold means" in line)
    row = lines[header + 2]
    fold_means = np.array([1.0, (2 / 3 + 1) / 2])
    cells = [cell.strip() for cell in row.strip("|").split("|")][1:]
    expected = f"{100 * fold_means.mean():.2f} ± {100 * fold_means.std():.2f}"
    assert cells[list(EVAL_GROUPS).index("myocardium")] == expected


def test_volume_table_shows_bias_limits_and_r(tmp_path, capsys):
    truth = np.zeros((1, 10, 10), np.uint8)
    truth[0, :5] = 1
    truth[0, 2:4] = 2  # 20 scar pixels of a 50-pixel myocardium: burden 40 %
    cases = {}
    for case, scar_rows in (("c1", 1), ("c2", 3)):  # 10 and 30 of the 50 pixels predicted scar
        prediction = truth.copy()
        prediction[0, 2:4] = 1
        prediction[0, 2:2 + scar_rows] = 2
        cases[case] = prediction
    metrics = MetricAccumulator()
    for case, prediction in cases.items():
        metrics.update(case, prediction, truth, (10.0, 10.0, 10.0))  # 1 mL voxels
    folder = tmp_path / "v"
    folder.mkdir()
    metrics.write_json(folder / "summary.json")
    assert main([f"run={folder}", "--volumes"]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| run |")][-1]
    # Scar burden: 20 % and 60 % against 40 %: bias 0, SD of (-20, 20) = 28.28, limits +-55.4;
    # the label is the same in both cases, so r is undefined.
    cells = [cell.strip() for cell in row.split("|")[2:-1]]
    assert cells[2] == "0.0 [-55.4, 55.4], r -"
    assert cells[0] == "0.0 [-27.7, 27.7], r -"  # 10 and 30 mL against 20
    old = _summary_dir(tmp_path, "old", {"c1": np.zeros((1, 8, 8), np.uint8)})
    payload = json.loads((old / "summary.json").read_text())
    del payload["volumes"]
    (old / "summary.json").write_text(json.dumps(payload))
    assert main([str(old), "--volumes"]) == 1
    assert "run test.py again" in capsys.readouterr().err
