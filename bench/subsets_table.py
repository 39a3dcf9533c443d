"""Markdown comparison of ``test.py --all_subsets`` results: Dice per sequence subset and run.

    python -m bench.subsets_table plain=runs/myops2020_missing/plain/test \
        dropout=runs/myops2020_missing/dropout/test balanced=runs/myops2020_missing/balanced/test \
        [--groups scar,scar+edema] [--folds 5]

Each argument is ``label=folder`` (or a folder, labelled by its parent's name): the output folder
of ``test.py --all_subsets``, holding ``subsets.json`` and one folder per subset with its
``summary.json``. One table per evaluation group: a row per run, a column per subset (in the
order test.py wrote them, smallest first) and the mean over the subsets, the single figure
missing-modality papers (PASSION, DMAF-Net) rank by. Every run must hold the same subsets and
the same cases.

``--folds K`` writes each cell as the mean ± std of the K fold means (the cases of fold k as
:func:`datasets.folds.fold_cases` deals them) instead of the mean over cases alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from bench.measure import print_lines
from bench.results_table import fold_means, parse_runs, read_case_dice, read_obtained
from datasets.labels import EVAL_GROUPS


def read_subsets(folder: Path) -> list[str]:
    """The subset labels (``LGE+T2w``) of ``folder/subsets.json``, in the order written."""
    path = folder / "subsets.json"
    try:
        labels = [str(entry["subset"]) for entry in json.loads(path.read_text())["subsets"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not the subset table of test.py --all_subsets "
                         f"({error!r})") from error
    if not labels:
        raise ValueError(f"{path}: lists no subsets")
    return labels


def read_run(folder: Path) -> dict[str, dict[str, dict[str, float]]]:
    """``subset -> case -> group -> Dice`` of one ``--all_subsets`` output folder."""
    return {subset: read_case_dice(folder / subset) for subset in read_subsets(folder)}


def cell_values(dice: dict[str, dict[str, float]], group: str, folds: int | None) -> np.ndarray:
    """The values a cell summarises: per-case Dice, or the ``folds`` fold means."""
    if not folds:
        return np.array([dice[case][group] for case in sorted(dice)])
    return fold_means(dice, group, folds)


def group_table(runs: dict[str, dict[str, dict[str, dict[str, float]]]], group: str,
                folds: int | None) -> str:
    """Rows: runs; columns: subsets, then the mean over subsets. Dice %."""
    subsets = list(next(iter(runs.values())))
    spread = f"mean ± std over {folds} fold means" if folds else "mean over cases"
    lines = [f"| {group} Dice % ({spread}) | " + " | ".join(subsets) + " | mean over subsets |",
             "|---|" + "---|" * (len(subsets) + 1)]
    def cell(values: np.ndarray) -> str:
        return f"{values.mean():.1f} ± {values.std():.1f}" if folds else f"{values.mean():.1f}"

    for label, by_subset in runs.items():
        per_subset = [100 * cell_values(by_subset[subset], group, folds) for subset in subsets]
        # Averaged case by case (or fold by fold) first, so the spread is that of the average.
        cells = [*map(cell, per_subset), cell(np.mean(per_subset, axis=0))]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check_same(runs: dict[str, dict[str, dict[str, dict[str, float]]]]) -> None:
    """Every run holds the same subsets, and every subset of every run the same cases."""
    first, reference = next(iter(runs.items()))
    cases = set(next(iter(reference.values())))
    for label, by_subset in runs.items():
        if list(by_subset) != list(reference):
            raise ValueError(f"runs {first!r} and {label!r} hold different subsets: "
                             f"{list(reference)} against {list(by_subset)}")
        for subset, dice in by_subset.items():
            if set(dice) != cases:
                raise ValueError(f"run {label!r}, subset {subset}: cases differ from "
                                 f"{first!r}'s: {sorted(set(dice) ^ cases)}")


def parse_groups(text: str | None) -> list[str]:
    if text is None:
        return list(EVAL_GROUPS)
    groups = [group.strip() for group in text.split(",") if group.strip()]
    unknown = [group for group in groups if group not in EVAL_GROUPS]
    if unknown or not groups:
        raise ValueError(f"--groups {text!r}: choose among {list(EVAL_GROUPS)}")
    return groups


def report(args: argparse.Namespace) -> list[str]:
    groups = parse_groups(args.groups)
    if args.folds is not None and args.folds < 2:
        raise ValueError(f"--folds must be at least 2, got {args.folds}")
    folders = parse_runs(args.runs)
    runs = {label: read_run(folder) for label, folder in folders.items()}
    check_same(runs)
    tables = [group_table(runs, group, args.folds) for group in groups]
    notes = {label: read_obtained(folder / next(iter(runs[label])))
             for label, folder in folders.items()}
    lines = ["\n\n".join(tables)]
    if any(notes.values()):
        lines.append("\n" + "\n".join(f"- {label}: {note}" for label, note in notes.items()
                                       if note))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="label=folder written by test.py --all_subsets")
    parser.add_argument("--groups", default=None,
                        help=f"comma-separated groups to show (default: {', '.join(EVAL_GROUPS)})")
    parser.add_argument("--folds", type=int, default=None,
                        help="write each cell as mean ± std over these K cross-validation folds")
    return print_lines(lambda: report(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
