"""How far a set of predicted measurements is from the label's: a method-comparison summary.

Dice says where the pathology lies; what a CMR report carries is how much of it there is (the
volumes and burdens of :func:`datasets.labels.group_volumes` and :func:`datasets.labels.burdens`).
Paired over cases, prediction against label, they are summarised as a method-comparison study
does (Bland and Altman 1986): the mean difference (bias, prediction minus label), its 95 % limits
of agreement (bias ± 1.96 SD of the differences), the mean absolute difference and Pearson's r.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats

from datasets.labels import BURDENS
from utils import aligned_rows


def agreement(predicted: Sequence[float], truth: Sequence[float]) -> dict[str, float | int | None]:
    """Bland-Altman summary of paired measurements (prediction minus truth).

    ``n``, ``truth_mean``, ``predicted_mean``, ``bias``, ``sd`` (of the differences, ddof 1),
    ``loa_low``/``loa_high`` (bias ∓ 1.96 sd), ``mae`` and ``pearson_r``. With fewer than 2
    pairs ``sd``, the limits and ``r`` are None; ``r`` is None too when either side is constant.
    """
    pred = np.asarray(predicted, dtype=np.float64)
    true = np.asarray(truth, dtype=np.float64)
    if pred.shape != true.shape or pred.ndim != 1:
        raise ValueError(f"expected two equal-length 1-D sequences, got {pred.shape} and "
                         f"{true.shape}")
    if pred.size == 0:
        raise ValueError("no pairs to compare")
    if not (np.isfinite(pred).all() and np.isfinite(true).all()):
        raise ValueError("measurements must be finite")
    difference = pred - true
    bias = float(difference.mean())
    result: dict[str, float | int | None] = {
        "n": int(pred.size), "truth_mean": float(true.mean()),
        "predicted_mean": float(pred.mean()), "bias": bias,
        "mae": float(np.abs(difference).mean()),
        "sd": None, "loa_low": None, "loa_high": None, "pearson_r": None}
    if pred.size >= 2:
        sd = float(difference.std(ddof=1))
        result |= {"sd": sd, "loa_low": bias - 1.96 * sd, "loa_high": bias + 1.96 * sd}
        if np.ptp(pred) > 0 and np.ptp(true) > 0:
            result["pearson_r"] = float(stats.pearsonr(pred, true).statistic)
    return result


def format_agreement(rows: Mapping[str, Mapping[str, float | int | None]]) -> str:
    """One line per quantity: label and predicted means, bias [limits of agreement], MAE, r.

    Group volumes are in mL, burdens in % of the myocardium (the names say which).
    """
    header = ("quantity", "label", "predicted", "bias [95% limits]", "MAE", "r")

    def number(value: float | int | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    body = []
    for name, row in rows.items():
        unit = " (%)" if name in BURDENS else " (mL)"
        limits = ("" if row["loa_low"] is None
                  else f" [{number(row['loa_low'])}, {number(row['loa_high'])}]")
        body.append((name + unit, number(row["truth_mean"]), number(row["predicted_mean"]),
                     number(row["bias"]) + limits, number(row["mae"]),
                     number(row["pearson_r"], 2)))
    return "\n".join(aligned_rows(header, body))
