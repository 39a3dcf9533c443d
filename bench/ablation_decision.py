"""Apply docs/ablation.md's pre-registered rule: which of the release's parts become defaults?

    python -m bench.ablation_decision immseg=runs/myops2020_cv/immseg/test \
        pixel_exchange=runs/myops2020_ablation/pixel_exchange/test \
        release_schedule=runs/myops2020_ablation/release_schedule/test \
        release_contrast=runs/myops2020_ablation/release_contrast/test \
        [--combined release_parts=runs/myops2020_ablation/release_parts/test]

The first run is ``immseg`` (our defaults), each other one ``immseg`` with one part of the
release switched on; all are test.py results over the same cases. The rule, written down before
the rows were finished: the framework reproduces I_MMSeg first, so a release part becomes the
default unless ours is measurably better, which needs both, in scar+edema or in the whole
myocardium:

* the release row's mean Dice is lower than ``immseg``'s by more than 1 point;
* ``immseg`` is higher in at least 60 % of the cases (18 of 30).

``--combined`` (all parts together) is measured the same way against ``immseg`` and against the
combination the single rows choose, when that combination is one of the runs given (``immseg``
itself when no part is chosen); any other combination is named as still to be trained.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.measure import print_lines
from bench.results_table import read_case_dice

#: Groups in which ours can be measurably better.
DECIDING_GROUPS = ("scar+edema", "whole myocardium")
MARGIN = 1.0
WIN_SHARE = 0.6


@dataclass(frozen=True)
class Comparison:
    """``reference`` against ``row`` in one group: the mean Dice difference (points) and the
    cases in which the reference is higher."""

    group: str
    lead: float
    wins: int
    cases: int

    @property
    def measurable(self) -> bool:
        return self.lead > MARGIN and self.wins >= math.ceil(WIN_SHARE * self.cases)

    def __str__(self) -> str:
        return f"{self.group}: {self.lead:+.1f} points, higher in {self.wins}/{self.cases}"


def compare(reference: dict[str, dict[str, float]], row: dict[str, dict[str, float]],
            names: tuple[str, str]) -> list[Comparison]:
    """The reference's lead over ``row`` in each deciding group (the same cases required)."""
    if set(reference) != set(row):
        raise ValueError(f"{names[0]} and {names[1]} hold different cases: "
                         f"{sorted(set(reference) ^ set(row))}")
    comparisons = []
    for group in DECIDING_GROUPS:
        lead = 100 * sum(reference[case][group] - row[case][group]
                         for case in reference) / len(reference)
        wins = sum(reference[case][group] > row[case][group] for case in reference)
        comparisons.append(Comparison(group, lead, wins, len(reference)))
    return comparisons


def _describe(reference: str, row: str, comparisons: list[Comparison]) -> str:
    better = [c.group for c in comparisons if c.measurable]
    verdict = (f"{reference} measurably better in {', '.join(better)}" if better
               else f"{reference} not measurably better")
    return f"{row} against {reference}: " + "; ".join(map(str, comparisons)) + f" -> {verdict}"


def decide(runs: dict[str, Path], combined: tuple[str, Path] | None = None
           ) -> tuple[dict[str, str], list[str]]:
    """(each part's choice, "ours" or "release"; the report's lines)."""
    cases = {label: read_case_dice(folder) for label, folder in runs.items()}
    reference, *parts = cases
    if not parts:
        raise ValueError("name immseg and at least one release row")
    choices, lines = {}, [f"Rule: ours stays only where {reference} leads by more than "
                          f"{MARGIN:g} point and is higher in at least {WIN_SHARE:.0%} of the "
                          f"cases ({' or '.join(DECIDING_GROUPS)})."]
    for part in parts:
        comparisons = compare(cases[reference], cases[part], (reference, part))
        choices[part] = "ours" if any(c.measurable for c in comparisons) else "release"
        lines.append(f"- {_describe(reference, part, comparisons)}: {choices[part]}")
    chosen = [part for part, choice in choices.items() if choice == "release"]
    lines.append("Chosen: " + (", ".join(chosen) if chosen else "no release part") + ".")
    if combined:
        label, folder = combined
        together = read_case_dice(folder)
        # the chosen combination, when it is a run in hand: immseg (none chosen) or one part
        against = [reference] + (chosen if len(chosen) == 1 else [])
        for other in against:
            comparisons = compare(cases[other], together, (other, label))
            lines.append(f"- {_describe(other, label, comparisons)}")
        if len(chosen) == len(parts):
            lines.append(f"  {label} is the chosen combination itself.")
        elif len(chosen) > 1:
            lines.append(f"  The chosen combination ({' + '.join(chosen)}) has no run yet: "
                         "train it to compare.")
    return choices, lines


def _parse(text: str) -> tuple[str, Path]:
    label, sep, folder = text.partition("=")
    if not sep or not label:
        raise argparse.ArgumentTypeError(f"{text!r}: expected label=folder")
    return label, Path(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=_parse,
                        help="immseg=folder, then one label=folder per release part")
    parser.add_argument("--combined", type=_parse, default=None,
                        help="label=folder of the run with every part switched on")
    args = parser.parse_args(argv)
    return print_lines(lambda: decide(dict(args.runs), args.combined)[1])


if __name__ == "__main__":
    sys.exit(main())
