"""Known-value tests for Dice, HD95, the empty-mask rule and the metric accumulator."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from medpy.metric.binary import hd95 as medpy_hd95

from datasets.labels import EDEMA, EVAL_GROUPS, NORMAL_MYOCARDIUM, SCAR
from evaluation.metrics import MetricAccumulator, dice, group_scores, hd95

SPACING = (3.0, 1.0, 1.0)  # slice spacing 3 mm, in-plane 1 mm


def _square(shape: tuple[int, ...], rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[..., rows, cols] = True
    return mask


def test_dice_of_two_overlapping_squares() -> None:
    # Two 4x4 squares overlapping in a 2x2 corner: 2 * 4 / (16 + 16).
    a = _square((1, 10, 10), slice(0, 4), slice(0, 4))
    b = _square((1, 10, 10), slice(2, 6), slice(2, 6))
    assert dice(a, b) == pytest.approx(0.25)
    assert dice(a, a) == 1.0
    # Disjoint squares.
    c = _square((1, 10, 10), slice(6, 10), slice(6, 10))
    assert dice(a, c) == 0.0


def test_dice_of_nested_masks() -> None:
    # A 2x2 square inside a 4x4 square: 2 * 4 / (4 + 16).
    outer = _square((1, 8, 8), slice(0, 4), slice(0, 4))
    inner = _square((1, 8, 8), slice(1, 3), slice(1, 3))
    assert dice(inner, outer) == pytest.approx(0.4)


def test_hd95_uses_spacing_along_the_right_axis() -> None:
    # A one-slice plate moved by 2 slices: every surface voxel is 2 * 3 mm from the other plate.
    gt = np.zeros((6, 8, 8), dtype=bool)
    gt[1, 2:6, 2:6] = True
    pred = np.roll(gt, 2, axis=0)
    assert hd95(pred, gt, SPACING) == pytest.approx(6.0)
    # The same shift in voxels along the column axis, spaced 2 mm: 4 mm.
    gt_w = np.zeros((6, 8, 8), dtype=bool)
    gt_w[1:5, 2:6, 2] = True
    pred_w = np.roll(gt_w, 2, axis=2)
    assert hd95(pred_w, gt_w, (3.0, 0.5, 2.0)) == pytest.approx(4.0)
    assert hd95(gt, gt, SPACING) == 0.0


def test_hd95_on_a_cropped_box_matches_the_full_volume() -> None:
    rng = np.random.default_rng(0)
    for _ in range(3):
        pred = rng.random((6, 24, 24)) > 0.97
        gt = rng.random((6, 24, 24)) > 0.97
        pred[2:4, 10:14, 10:14] = True
        gt[0, 0, :] = True  # touches the volume border
        spacing = (5.0, 1.25, 1.25)
        expected = medpy_hd95(pred, gt, voxelspacing=spacing)
        assert hd95(pred, gt, spacing) == pytest.approx(expected)


def test_empty_mask_rule_all_four_cases() -> None:
    shape, spacing = (3, 4, 4), (4.0, 3.0, 12.0)
    empty = np.zeros(shape, dtype=bool)
    full = np.zeros(shape, dtype=bool)
    full[1, 1:3, 1:3] = True
    # Physical extent 12 x 12 x 48 mm.
    diagonal = math.sqrt(12.0**2 + 12.0**2 + 48.0**2)

    assert dice(empty, empty) == 1.0
    assert hd95(empty, empty, spacing) == 0.0
    assert dice(empty, full) == 0.0
    assert hd95(empty, full, spacing) == pytest.approx(diagonal)
    assert dice(full, empty) == 0.0
    assert hd95(full, empty, spacing) == pytest.approx(diagonal)
    assert dice(full, full) == 1.0
    assert hd95(full, full, spacing) == 0.0


def test_empty_mask_rule_applies_inside_group_scores() -> None:
    gt = np.zeros((2, 5, 5), dtype=np.uint8)
    gt[0, 1:3, 1:3] = SCAR
    pred = np.zeros_like(gt)
    scores = group_scores(pred, gt, (10.0, 1.0, 1.0))
    assert scores["scar"] == {"dice": 0.0, "hd95": pytest.approx(math.sqrt(20.0**2 + 25 + 25))}
    assert scores["edema alone"] == {"dice": 1.0, "hd95": 0.0}


def test_bad_inputs_raise() -> None:
    a = np.zeros((2, 4, 4), dtype=bool)
    b = np.zeros((2, 4, 5), dtype=bool)
    with pytest.raises(ValueError, match="shape"):
        dice(a, b)
    with pytest.raises(ValueError, match="shape"):
        hd95(a, b, SPACING)
    with pytest.raises(ValueError, match="shape"):
        group_scores(a.astype(np.uint8), b.astype(np.uint8), SPACING)
    with pytest.raises(ValueError, match="spacing"):
        hd95(a, a, (1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        group_scores(a.astype(np.uint8), a.astype(np.uint8), (1.0, 0.0, 1.0))
    with pytest.raises(TypeError, match="boolean"):
        dice(a.astype(np.uint8), a)


def test_group_union_scar_plus_edema() -> None:
    # Scar and edema swapped between prediction and ground truth: each alone scores 0, their
    # union is exact. Myocardium overlaps half.
    gt = np.zeros((1, 8, 8), dtype=np.uint8)
    gt[0, 0:2, 0:4] = SCAR
    gt[0, 2:4, 0:4] = EDEMA
    gt[0, 4:6, 0:4] = NORMAL_MYOCARDIUM
    pred = gt.copy()
    pred[0, 0:2, 0:4] = EDEMA
    pred[0, 2:4, 0:4] = SCAR
    pred[0, 4:6, 2:4] = 0
    scores = group_scores(pred, gt, SPACING)
    assert set(scores) == set(EVAL_GROUPS)
    assert scores["scar"]["dice"] == 0.0
    assert scores["edema alone"]["dice"] == 0.0
    assert scores["scar+edema"]["dice"] == 1.0
    assert scores["scar+edema"]["hd95"] == 0.0
    # Myocardium: 4 of 8 voxels kept -> 2 * 4 / (4 + 8).
    assert scores["myocardium"]["dice"] == pytest.approx(2 / 3)
    # Whole myocardium: 20 predicted voxels inside 24 -> 2 * 20 / (20 + 24).
    assert scores["whole myocardium"]["dice"] == pytest.approx(40 / 44)


def _case(scar_shift: int, edema_cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Scar plate moved by ``scar_shift`` slices; edema plate cut to ``edema_cols`` of 4 columns."""
    gt = np.zeros((6, 8, 8), dtype=np.uint8)
    gt[1, 0:4, 0:4] = SCAR
    gt[4, 0:4, 0:4] = EDEMA
    pred = np.zeros_like(gt)
    pred[1 + scar_shift, 0:4, 0:4] = SCAR
    pred[4, 0:4, 0:edema_cols] = EDEMA
    return pred, gt


# case -> (scar shift, edema columns, scar Dice, scar HD95 mm, edema Dice), worked out by hand:
# edema Dice = 2 * 4k / (16 + 4k) for k kept columns.
CASES = {
    "case_b": (0, 4, 1.0, 0.0, 1.0),
    "case_a": (2, 2, 0.0, 6.0, 16 / 24),
    "case_c": (1, 1, 0.0, 3.0, 8 / 20),
}


@pytest.fixture
def filled() -> MetricAccumulator:
    acc = MetricAccumulator(groups={"scar": (SCAR,), "edema alone": (EDEMA,)})
    for case_id, (shift, cols, *_) in CASES.items():
        acc.update(case_id, *_case(shift, cols), SPACING)
    return acc


def test_accumulator_mean_std_match_numpy(filled: MetricAccumulator) -> None:
    order = sorted(CASES)
    scar_dice = np.array([CASES[c][2] for c in order])
    scar_hd = np.array([CASES[c][3] for c in order])
    edema_dice = np.array([CASES[c][4] for c in order])

    rows = filled.per_case()
    assert [row["case"] for row in rows] == order
    assert [row["scar_hd95"] for row in rows] == pytest.approx(scar_hd.tolist())
    assert [row["edema alone_dice"] for row in rows] == pytest.approx(edema_dice.tolist())

    summary = filled.summary()
    assert summary["scar"]["dice"] == {"mean": pytest.approx(scar_dice.mean()),
                                       "std": pytest.approx(scar_dice.std()), "n": 3}
    assert summary["scar"]["hd95"]["mean"] == pytest.approx(3.0)
    assert summary["scar"]["hd95"]["std"] == pytest.approx(math.sqrt((9 + 9 + 0) / 3))
    assert summary["edema alone"]["dice"]["mean"] == pytest.approx(edema_dice.mean())
    assert summary["edema alone"]["dice"]["std"] == pytest.approx(edema_dice.std())
    assert filled.mean_dice() == pytest.approx((scar_dice.mean() + edema_dice.mean()) / 2)
    assert filled.mean_dice(("edema alone",)) == pytest.approx(edema_dice.mean())


def test_accumulator_is_independent_of_update_order(filled: MetricAccumulator) -> None:
    reverse = MetricAccumulator(groups=filled.groups)
    for case_id in reversed(list(CASES)):
        shift, cols, *_ = CASES[case_id]
        reverse.update(case_id, *_case(shift, cols), SPACING)
    assert reverse.summary() == filled.summary()
    assert reverse.per_case() == filled.per_case()


def test_accumulator_rejects_duplicates_and_bad_queries(filled: MetricAccumulator) -> None:
    with pytest.raises(ValueError, match="case_a"):
        filled.update("case_a", *_case(0, 4), SPACING)
    with pytest.raises(ValueError, match="unknown group"):
        filled.mean_dice(("myocardium",))
    empty = MetricAccumulator()
    with pytest.raises(ValueError, match="no cases"):
        empty.summary()
    with pytest.raises(ValueError):
        MetricAccumulator(groups={})
    filled.reset()
    assert len(filled) == 0


def test_csv_and_json_round_trip(filled: MetricAccumulator, tmp_path) -> None:
    csv_path = tmp_path / "out" / "cases.csv"
    json_path = tmp_path / "out" / "metrics.json"
    filled.write_csv(csv_path)
    filled.write_json(json_path)
    assert sorted(p.name for p in csv_path.parent.iterdir()) == ["cases.csv", "metrics.json"]

    with open(csv_path, newline="") as handle:
        read = list(csv.DictReader(handle))
    expected = filled.per_case()
    assert [row["case"] for row in read] == [row["case"] for row in expected]
    for got, want in zip(read, expected, strict=True):
        assert set(got) == set(want)
        for key in want.keys() - {"case"}:
            assert float(got[key]) == want[key]

    payload = json.loads(json_path.read_text())
    assert payload["summary"] == filled.summary()
    assert payload["cases"] == expected
    assert payload["groups"] == {"scar": [SCAR], "edema alone": [EDEMA]}


def test_table_lists_every_group() -> None:
    acc = MetricAccumulator()
    gt = np.zeros((2, 6, 6), dtype=np.uint8)
    gt[0, 1:5, 1:5] = NORMAL_MYOCARDIUM
    gt[0, 2:4, 2:4] = SCAR
    gt[1, 2:4, 2:4] = EDEMA
    acc.update("perfect", gt, gt.copy(), SPACING)
    table = acc.format_table()
    for group in EVAL_GROUPS:
        assert group in table
    assert "Dice (%)" in table and "HD95 (mm)" in table
    assert table.count("100.00 ± 0.00") == len(EVAL_GROUPS)
    assert "n = 1 cases" in table
