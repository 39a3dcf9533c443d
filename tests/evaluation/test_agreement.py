"""Known-value tests for the agreement of predicted volumes and burdens with the label's."""

from __future__ import annotations

import math

import numpy as np
import pytest

from datasets.labels import (
    EDEMA,
    NORMAL_MYOCARDIUM,
    SCAR,
)
from evaluation.agreement import agreement, format_agreement
from evaluation.metrics import MetricAccumulator

SPACING = (5.0, 2.0, 1.0)  # 10 mm^3 = 0.01 mL per voxel


def _labels(normal: int, scar: int, edema: int) -> np.ndarray:
    """A [2, 10, 10] map holding the given voxel counts of each class."""
    flat = np.zeros(200, np.uint8)
    flat[:normal] = NORMAL_MYOCARDIUM
    flat[normal:normal + scar] = SCAR
    flat[normal + scar:normal + scar + edema] = EDEMA
    return flat.reshape(2, 10, 10)


def test_agreement_matches_hand_computed_bland_altman() -> None:
    row = agreement([2.0, 4.0, 6.0], [1.0, 4.0, 8.0])
    # Differences 1, 0, -2: bias -1/3, SD sqrt(((4/3)^2 + (1/3)^2 + (5/3)^2) / 2).
    sd = math.sqrt((16 / 9 + 1 / 9 + 25 / 9) / 2)
    assert row["n"] == 3
    assert row["bias"] == pytest.approx(-1 / 3)
    assert row["sd"] == pytest.approx(sd)
    assert row["loa_low"] == pytest.approx(-1 / 3 - 1.96 * sd)
    assert row["loa_high"] == pytest.approx(-1 / 3 + 1.96 * sd)
    assert row["mae"] == pytest.approx(1.0)
    assert row["truth_mean"] == pytest.approx(13 / 3)
    assert row["predicted_mean"] == pytest.approx(4.0)
    # Centred values (-2, 0, 2) and (-10/3, -1/3, 11/3): r = 14 / sqrt(8 * 74/3).
    assert row["pearson_r"] == pytest.approx(14 / math.sqrt(8 * 74 / 3))


def test_agreement_edge_cases_and_bad_input() -> None:
    constant = agreement([1.0, 1.0], [2.0, 3.0])
    assert constant["pearson_r"] is None and constant["bias"] == pytest.approx(-1.5)
    single = agreement([1.0], [3.0])
    assert single["sd"] is None and single["loa_low"] is None and single["mae"] == 2.0
    with pytest.raises(ValueError, match="no pairs"):
        agreement([], [])
    with pytest.raises(ValueError, match="equal-length"):
        agreement([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="finite"):
        agreement([float("nan")], [1.0])


def test_accumulator_summarises_volumes_and_burdens() -> None:
    acc = MetricAccumulator()
    # (prediction, label) voxel counts of normal, scar, edema.
    cases = {"a": ((30, 10, 20), (30, 20, 10)),
             "b": ((40, 0, 0), (20, 10, 10)),
             "c": ((10, 5, 5), (0, 0, 0))}  # no myocardium in the label: no burden
    for name, (pred, true) in cases.items():
        acc.update(name, _labels(*pred), _labels(*true), SPACING)
    rows = {row["case"]: row for row in acc.per_case()}
    assert rows["a"]["scar_ml_pred"] == pytest.approx(0.1)
    assert rows["a"]["scar_ml_label"] == pytest.approx(0.2)
    assert rows["c"]["whole myocardium_ml_label"] == 0.0

    summary = acc.volume_agreement()
    scar = summary["scar"]  # differences -0.1, -0.1, +0.05 mL
    assert scar["n"] == 3 and scar["bias"] == pytest.approx(-0.05)
    assert scar["mae"] == pytest.approx(0.25 / 3)
    burden = summary["scar burden"]  # a: 16.7 vs 33.3; b: 0 vs 25
    assert burden["n"] == 2
    assert burden["predicted_mean"] == pytest.approx((100 / 6 + 0) / 2)
    assert burden["truth_mean"] == pytest.approx((100 / 3 + 25) / 2)
    assert summary["scar+edema burden"]["truth_mean"] == pytest.approx(50.0)

    merged = MetricAccumulator()
    merged.extend(acc)
    assert merged.volume_agreement() == summary
    text = format_agreement(summary)
    assert "scar burden (%)" in text and "scar (mL)" in text
    acc.reset()
    with pytest.raises(ValueError, match="no cases"):
        acc.volume_agreement()
