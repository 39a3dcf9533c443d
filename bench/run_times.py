"""Training time of runs, from their logs (JSON): what each model cost per fold.

    python -m bench.run_times runs/myops2020_cv/immseg runs/myops2020_cv/transunet

For each run (or each ``fold<k>`` of a cross-validation folder) the trainer's ``log.txt`` gives:

* ``wall_s``: the "finished in" time of the process that ended the run (a resumed run counts
  only its own part, and cores shared with other work lengthen it);
* ``median_epoch_s``: the median gap between consecutive epoch lines, which a pause or a
  neighbour's burst moves less;
* ``estimate_s``: ``median_epoch_s`` times the epochs, the training time on cores as quiet as
  the typical epoch's.

nnU-Net folds (``baselines.nnunet``) report the seconds their budget used (``budget.json``) as
``wall_s``, and the median of the "Epoch time" lines of their ``training_log_*.txt`` (every start
of a resumed fold writes one) times the epochs as ``estimate_s``, as for ours.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.measure import print_report

_STAMP = r"(?P<stamp>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"
_EPOCH = re.compile(_STAMP + r" INFO trainer: epoch (?P<epoch>\d+)/(?P<total>\d+): mean loss")
_FINISHED = re.compile(r"INFO trainer: finished in (?P<seconds>[\d.]+) s")
_NNUNET_EPOCH = re.compile(r": Epoch time: (?P<seconds>[\d.]+) s")


def log_times(log: Path) -> dict[str, Any]:
    """The times one trainer log holds (see the module docstring)."""
    text = log.read_text(errors="replace")
    epochs: dict[int, datetime] = {}
    total = None
    for match in _EPOCH.finditer(text):
        # A resumed run repeats epochs: the last line of each counts.
        epochs[int(match["epoch"])] = datetime.strptime(match["stamp"], "%Y-%m-%d %H:%M:%S,%f")
        total = int(match["total"])
    gaps = [(epochs[k] - epochs[k - 1]).total_seconds() for k in sorted(epochs)
            if k - 1 in epochs]
    finished = [float(m["seconds"]) for m in _FINISHED.finditer(text)]
    median = statistics.median(gaps) if gaps else None
    return {"epochs_logged": len(epochs), "epochs": total,
            "wall_s": finished[-1] if finished else None,
            "median_epoch_s": None if median is None else round(median, 2),
            "estimate_s": None if median is None or total is None else round(median * total, 1)}


def nnunet_times(fold: Path) -> dict[str, Any]:
    """One nnU-Net fold's budget (``budget.json``) and the median of its logged epoch times."""
    used = json.loads((fold / "budget.json").read_text())
    epoch_s = [float(match["seconds"]) for log in sorted(fold.glob("training_log_*.txt"))
               for match in _NNUNET_EPOCH.finditer(log.read_text(errors="replace"))]
    median = round(statistics.median(epoch_s), 2) if epoch_s else None
    return {"wall_s": round(used["seconds"], 1), "epochs": used["epochs"],
            "median_epoch_s": median,
            "estimate_s": None if median is None else round(median * used["epochs"], 1)}


def run_times(folder: Path) -> dict[str, Any]:
    """Per fold (or for the one run) of ``folder``, and their sums."""
    logs = sorted(folder.glob("fold*/log.txt")) or sorted(folder.glob("log.txt"))
    budgets = sorted(folder.glob("nnUNet_results/*/*/fold_*/budget.json"))
    if not logs and not budgets:
        raise ValueError(f"{folder}: no trainer log.txt and no nnU-Net budget.json")
    parts = {log.parent.name: log_times(log) for log in logs}
    for budget in budgets:
        parts[budget.parent.name] = nnunet_times(budget.parent)
    totals = {key: round(sum(part[key] for part in parts.values()), 1)
              for key in ("wall_s", "estimate_s")
              if parts and all(part.get(key) is not None for part in parts.values())}
    return {"folds": parts, "total": totals}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run or cross-validation folders")
    args = parser.parse_args(argv)
    return print_report(lambda: {run: run_times(Path(run)) for run in args.runs})


if __name__ == "__main__":
    sys.exit(main())
