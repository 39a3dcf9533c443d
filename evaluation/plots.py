"""Figures written next to the evaluation tables.

Figures are drawn on a bare :class:`matplotlib.figure.Figure` with the Agg canvas rather than
through pyplot: no global backend is selected, nothing needs a display, and no figure outlives
the call (pyplot keeps every figure alive until it is closed).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from evaluation.metrics import MetricAccumulator
from utils import atomic_path


def dice_by_group(metrics: MetricAccumulator) -> dict[str, list[float]]:
    """group -> per-case Dice, cases in the accumulator's (sorted) order."""
    rows = metrics.per_case()
    if not rows:
        raise ValueError("no cases have been scored yet")
    return {group: [float(row[f"{group}_dice"]) for row in rows] for group in metrics.groups}


def dice_boxplot(values: Mapping[str, Sequence[float]], path: str | os.PathLike[str], *,
                 title: str = "") -> None:
    """Write a PNG box plot of per-case Dice, one box per group, every case drawn as a dot.

    With the few test volumes of MyoPS a box alone hides how many cases it summarises, so each
    case is also shown (jittered with a fixed seed, so the figure is reproducible).
    """
    if not values:
        raise ValueError("a box plot needs at least one group")
    groups = list(values)
    data = []
    for group in groups:
        column = np.asarray(values[group], dtype=np.float64)
        if column.ndim != 1 or column.size == 0:
            raise ValueError(f"group {group!r} needs a non-empty list of Dice values")
        if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in column):
            raise ValueError(f"group {group!r} holds Dice values outside [0, 1]")
        data.append(column)
    figure = Figure(figsize=(1.4 * len(groups) + 1.5, 4.0), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    positions = np.arange(1, len(groups) + 1)
    axes.boxplot(data, positions=positions, widths=0.5, showmeans=True, showfliers=False)
    rng = np.random.default_rng(0)
    for position, column in zip(positions, data, strict=True):
        jitter = rng.uniform(-0.12, 0.12, column.size)
        axes.scatter(position + jitter, column, s=12, alpha=0.6, color="tab:blue", zorder=3)
    axes.set_xticks(positions, groups, rotation=20)
    axes.set_ylim(-0.02, 1.02)
    axes.set_ylabel("Dice")
    axes.yaxis.grid(True, alpha=0.3)
    axes.set_title(title or f"per-case Dice (n = {max(c.size for c in data)})", fontsize=10)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
