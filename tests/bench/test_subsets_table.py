from __future__ import annotations

import json

import numpy as np
import pytest

from bench.subsets_table import main
from datasets.labels import EVAL_GROUPS
from evaluation.metrics import MetricAccumulator

TRUTH = np.zeros((1, 8, 8), np.uint8)
TRUTH[0, 2:6, 2:6] = 1  # 16 pixels of normal myocardium


def _prediction(pixels: int) -> np.ndarray:
    """Normal myocardium on the first ``pixels`` of the truth's 16: Dice 2p / (p + 16)."""
    block = np.zeros(16, np.uint8)
    block[:pixels] = 1
    prediction = np.zeros_like(TRUTH)
    prediction[0, 2:6, 2:6] = block.reshape(4, 4)
    return prediction


def _run(tmp_path, name: str, subsets: dict[str, dict[str, int]]):
    """A test.py --all_subsets folder: subsets.json plus one summary.json per subset."""
    folder = tmp_path / name / "test"
    for subset, pixels in subsets.items():
        metrics = MetricAccumulator()
        for case, p in pixels.items():
            metrics.update(case, _prediction(p), TRUTH, (1.0, 1.0, 1.0))
        (folder / subset).mkdir(parents=True)
        metrics.write_json(folder / subset / "summary.json")
    (folder / "subsets.json").write_text(json.dumps(
        {"settings": {}, "subsets": [{"subset": s} for s in subsets]}))
    return folder


def _dice(pixels: int) -> float:
    return 100 * 2 * pixels / (pixels + 16)


def _row(out: str, table: str, label: str) -> list[str]:
    """The cells of ``label``'s row in the table whose header starts with ``table``."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {table} "))
    for line in lines[start + 2:]:
        if not line.startswith("| "):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if cells[0] == label:
            return cells[1:]
    raise AssertionError(f"no row {label!r} under {table!r}")


def test_cells_are_the_subsets_means_and_their_average(tmp_path, capsys):
    cases = ("c1", "c2", "c3", "c4")
    plain = _run(tmp_path, "plain", {"LGE": dict.fromkeys(cases, 8),
                                     "bSSFP+LGE": dict(zip(cases, (16, 16, 8, 8), strict=True))})
    dropout = _run(tmp_path, "dropout", {"LGE": dict.fromkeys(cases, 16),
                                         "bSSFP+LGE": dict.fromkeys(cases, 16)})
    assert main([f"plain={plain}", str(dropout)]) == 0
    out = capsys.readouterr().out
    for group in EVAL_GROUPS:
        assert f"| {group} Dice % (mean over cases) | LGE | bSSFP+LGE | mean over subsets |" in out
    lge, both = _dice(8), (_dice(16) + _dice(8)) / 2
    assert _row(out, "myocardium", "plain") == [f"{lge:.1f}", f"{both:.1f}",
                                                f"{(lge + both) / 2:.1f}"]
    # A bare folder is labelled by its parent's name.
    assert _row(out, "myocardium", "dropout") == ["100.0", "100.0", "100.0"]


def test_folds_give_the_spread_of_fold_means(tmp_path, capsys):
    # Sorted cases c1..c4 in 2 folds: fold 0 holds c1, c3; fold 1 holds c2, c4.
    run = _run(tmp_path, "a", {"LGE": {"c1": 16, "c2": 8, "c3": 16, "c4": 8}})
    assert main([str(run), "--folds", "2", "--groups", "myocardium"]) == 0
    out = capsys.readouterr().out
    fold_means = np.array([100.0, _dice(8)])
    expected = f"{fold_means.mean():.1f} ± {fold_means.std():.1f}"
    assert _row(out, "myocardium", "a") == [expected, expected]
    assert "| scar Dice" not in out


def test_runs_must_match_and_inputs_must_be_tables(tmp_path, capsys):
    a = _run(tmp_path, "a", {"LGE": {"c1": 8}, "T2w": {"c1": 8}})
    b = _run(tmp_path, "b", {"LGE": {"c1": 8}})
    c = _run(tmp_path, "c", {"LGE": {"c2": 8}, "T2w": {"c2": 8}})

    def error_of(argv: list[str]) -> str:
        assert main(argv) == 1
        return capsys.readouterr().err

    assert "different subsets" in error_of([str(a), str(b)])
    assert "cases differ" in error_of([str(a), str(c)])
    assert "subsets.json" in error_of([str(tmp_path / "a")])
    assert "given twice" in error_of([f"x={a}", f"x={b}"])
    assert "choose among" in error_of([str(a), "--groups", "scar,infarct"])
    assert "at least 2" in error_of([str(a), "--folds", "1"])
    (a / "T2w" / "summary.json").unlink()
    assert "T2w" in error_of([str(a)])


@pytest.mark.parametrize("pixels", [0, 4, 12])
def test_prediction_helper_has_the_dice_it_claims(pixels):
    metrics = MetricAccumulator()
    metrics.update("c", _prediction(pixels), TRUTH, (1.0, 1.0, 1.0))
    dice = metrics.summary()["myocardium"]["dice"]["mean"]
    assert 100 * dice == pytest.approx(_dice(pixels))
