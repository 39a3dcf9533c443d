"""Markdown comparison of test.py results: one row per run, Dice (and HD95) per group.

    python -m bench.results_table immseg=runs/myops_immseg/test \
        transunet=runs/myops_transunet/test immseg_noprior=runs/myops_immseg_noprior/test

Each argument is ``label=folder`` (or just a folder, labelled by its parent's name) holding the
``summary.json`` that test.py writes. Columns follow the evaluation groups' order. Runs over
different cases (one fold beside a whole cross-validation) show their case counts in the label.

``--folds K`` adds the spread over cross-validation folds: each run's Dice averaged per fold (the
cases of fold k as :func:`datasets.folds.fold_cases` deals them), then mean ± std of the K fold
means. The case-level std mixes case difficulty with model variance; the fold spread shows how much
a mean moves with the split.

``--volumes`` adds how each run measures the pathology as a report would: bias [95 % limits of
agreement] and Pearson r of the scar and scar+edema volumes (mL) and burdens (% of the
myocardium) against the label (``summary.json``'s ``volumes``, written by test.py since volumes
were added; an older summary is refused with a note to rerun test.py).

``--paired LABEL`` adds a case-by-case count: in how many test cases the run ``LABEL`` has a
higher Dice than each other run, per group. With few test volumes a mean can rest on one or two
cases; the count shows whether a difference is consistent.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from bench.measure import print_lines
from datasets.folds import fold_cases
from datasets.labels import BURDENS, EVAL_GROUPS

METRICS = {"dice": ("Dice %", 100.0, 2), "hd95": ("HD95 mm", 1.0, 2)}
#: The volume agreements ``--volumes`` shows: the pathology's volumes (mL) and burdens (%).
VOLUMES = ("scar", "scar+edema", *BURDENS)


def read_summary(folder: Path) -> dict:
    """The ``summary`` mapping (group -> metric -> mean/std/n) of ``folder/summary.json``."""
    path = folder / "summary.json"
    try:
        summary = json.loads(path.read_text())["summary"]
        for metrics in summary.values():
            for metric in METRICS:
                float(metrics[metric]["mean"]), float(metrics[metric]["std"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path}: not a test.py summary ({error!r})") from error
    order = {group: i for i, group in enumerate(EVAL_GROUPS)}
    return dict(sorted(summary.items(), key=lambda item: order.get(item[0], len(order))))


def read_obtained(folder: Path) -> str | None:
    """How test.py obtained the numbers (native space or the grid, label-free or ROI given,
    out of fold...), when its summary says."""
    try:
        payload = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    obtained = payload.get("obtained")
    evaluation = (payload.get("settings") or {}).get("evaluation")
    return "; ".join(part for part in (obtained, evaluation) if part) or None


def read_case_ids(folder: Path) -> set[str] | None:
    """The cases a summary was computed over; None when it does not list them."""
    try:
        return {str(row["case"]) for row in
                json.loads((folder / "summary.json").read_text())["cases"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def labelled_by_cases(folders: dict[str, Path]) -> dict[str, str]:
    """Each run's label, with its case count added when the runs hold different cases (a
    6-case fold beside a 30-case cross-validation must not read as the same comparison).
    Labels stay as given when a summary does not list its cases (no count to show)."""
    ids = {label: read_case_ids(folder) for label, folder in folders.items()}
    if any(cases is None for cases in ids.values()) or \
            len({frozenset(cases) for cases in ids.values()}) <= 1:
        return {label: label for label in folders}
    return {label: f"{label} ({len(cases)} case{'s' * (len(cases) != 1)})"
            for label, cases in ids.items()}


def read_case_dice(folder: Path) -> dict[str, dict[str, float]]:
    """Per-case Dice, ``case -> group -> value``, from ``folder/summary.json``."""
    path = folder / "summary.json"
    try:
        rows = json.loads(path.read_text())["cases"]
        return {str(row["case"]): {group: float(row[f"{group}_dice"]) for group in EVAL_GROUPS}
                for row in rows}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path}: no per-case Dice of every group ({error!r})") from error


def read_volumes(folder: Path) -> dict[str, dict]:
    """The ``volumes`` agreement rows of ``folder/summary.json`` that :data:`VOLUMES` names."""
    path = folder / "summary.json"
    try:
        volumes = json.loads(path.read_text()).get("volumes")
    except (OSError, ValueError, AttributeError) as error:
        raise ValueError(f"{path}: not a test.py summary ({error!r})") from error
    if not isinstance(volumes, dict) or not all(name in volumes for name in VOLUMES):
        raise ValueError(f"{path}: no volume agreement of {list(VOLUMES)} (written by an older "
                         "test.py: run test.py again)")
    return {name: volumes[name] for name in VOLUMES}


def volume_table(runs: dict[str, dict[str, dict]]) -> str:
    """One row per run: bias [95 % limits], r of each quantity of :data:`VOLUMES`."""
    units = {name: "%" if name in BURDENS else "mL" for name in VOLUMES}
    lines = ["| prediction - label: bias [95 % limits], r | "
             + " | ".join(f"{name} ({units[name]})" for name in VOLUMES) + " |",
             "|---|" + "---|" * len(VOLUMES)]
    for label, volumes in runs.items():
        cells = []
        for name in VOLUMES:
            row = volumes[name]
            limits = ("" if row.get("loa_low") is None
                      else f" [{row['loa_low']:.1f}, {row['loa_high']:.1f}]")
            r = "-" if row.get("pearson_r") is None else f"{row['pearson_r']:.2f}"
            cells.append(f"{row['bias']:.1f}{limits}, r {r}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(reference: str, cases: dict[str, dict[str, dict[str, float]]]) -> str:
    """Per group, the cases where ``reference`` has a higher Dice than each other run (k/n).

    Ties are cases where neither is higher (for example both 1 on an empty mask), shown as
    ``k/n (t tied)``. Every run must hold the same cases.
    """
    if reference not in cases:
        raise ValueError(f"--paired {reference!r} is not one of the runs {list(cases)}")
    if len(cases) < 2:
        raise ValueError("--paired needs at least one other run to compare with")
    ours = cases[reference]
    lines = [f"| {reference} Dice higher in | " + " | ".join(EVAL_GROUPS) + " |",
             "|---|" + "---|" * len(EVAL_GROUPS)]
    for label, theirs in cases.items():
        if label == reference:
            continue
        if set(theirs) != set(ours):
            raise ValueError(f"runs {reference!r} and {label!r} hold different cases: "
                             f"{sorted(set(ours) ^ set(theirs))}")
        cells = []
        for group in EVAL_GROUPS:
            higher = sum(ours[case][group] > theirs[case][group] for case in ours)
            tied = sum(ours[case][group] == theirs[case][group] for case in ours)
            cells.append(f"{higher}/{len(ours)}" + (f" ({tied} tied)" if tied else ""))
        lines.append(f"| vs {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_table(runs: dict[str, dict], metric: str) -> str:
    """One row per run, one column per group: ``mean ± std`` of ``metric``."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    if not runs:
        raise ValueError("no runs to tabulate")
    title, scale, digits = METRICS[metric]
    groups = list(next(iter(runs.values())))
    for label, summary in runs.items():
        if list(summary) != groups:
            raise ValueError(f"run {label!r} has groups {list(summary)}, expected {groups}")
    lines = [f"| {title} | " + " | ".join(groups) + " |",
             "|---|" + "---|" * len(groups)]
    for label, summary in runs.items():
        cells = []
        for group in groups:
            value = summary[group][metric]
            cells.append(f"{scale * value['mean']:.{digits}f} ± {scale * value['std']:.{digits}f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fold_means(dice: dict[str, dict[str, float]], group: str, folds: int) -> np.ndarray:
    """The ``folds`` means of ``group``'s per-case Dice, fold k over the cases
    :func:`datasets.folds.fold_cases` deals it."""
    split = [fold_cases(sorted(dice), folds, k)[1] for k in range(folds)]
    return np.array([np.mean([dice[case][group] for case in test]) for test in split])


def fold_table(cases: dict[str, dict[str, dict[str, float]]], folds: int) -> str:
    """Per run and group, ``mean ± std`` over the ``folds`` fold means of per-case Dice (%)."""
    lines = [f"| Dice %, mean ± std over {folds} fold means | " + " | ".join(EVAL_GROUPS) + " |",
             "|---|" + "---|" * len(EVAL_GROUPS)]
    for label, dice in cases.items():
        cells = []
        for group in EVAL_GROUPS:
            means = fold_means(dice, group, folds)
            cells.append(f"{100 * means.mean():.2f} ± {100 * means.std():.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_run(text: str) -> tuple[str, Path]:
    """``label=folder`` -> ``(label, folder)``; a bare folder is labelled by its parent's name."""
    label, sep, folder = text.partition("=")
    if sep and not label:
        raise ValueError(f"{text!r}: empty label before '='")
    if not sep:
        path = Path(text)
        return path.resolve().parent.name, path
    return label, Path(folder)


def parse_runs(texts: list[str]) -> dict[str, Path]:
    """``label -> folder`` of the ``label=folder`` arguments, in order; a label given twice is
    refused."""
    folders: dict[str, Path] = {}
    for text in texts:
        label, folder = parse_run(text)
        if label in folders:
            raise ValueError(f"label {label!r} given twice")
        folders[label] = folder
    return folders


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="label=folder with summary.json")
    parser.add_argument("--paired", metavar="LABEL", default=None,
                        help="count the cases where this run's Dice beats each other run's")
    parser.add_argument("--folds", type=int, default=None,
                        help="add the spread over these K cross-validation folds")
    parser.add_argument("--volumes", action="store_true",
                        help="add the agreement of scar and scar+edema volumes and burdens "
                             "with the label")
    args = parser.parse_args(argv)
    return print_lines(lambda: report(args))


def report(args: argparse.Namespace) -> list[str]:
    """The tables the flags ask for, then how each run's numbers were obtained."""
    folders = parse_runs(args.runs)
    runs = {label: read_summary(folder) for label, folder in folders.items()}
    shown = labelled_by_cases(folders)
    tables = [markdown_table({shown[label]: summary for label, summary in runs.items()}, metric)
              for metric in METRICS]
    if args.paired is not None or args.folds:
        cases = {label: read_case_dice(folder) for label, folder in folders.items()}
    if args.folds:
        tables.append(fold_table(cases, args.folds))
    if args.paired is not None:
        tables.append(paired_table(args.paired, cases))
    if args.volumes:
        tables.append(volume_table({shown[label]: read_volumes(folder)
                                    for label, folder in folders.items()}))
    lines = ["\n\n".join(tables)]
    notes = {label: read_obtained(folder) for label, folder in folders.items()}
    if any(notes.values()):
        lines.append("\n" + "\n".join(f"- {label}: {note}" for label, note in notes.items()
                                       if note))
    return lines


if __name__ == "__main__":
    sys.exit(main())
