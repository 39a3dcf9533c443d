"""Markdown table of misalignment benches: aligned Dice and what each condition loses.

    python -m bench.misalignment_table immseg=runs/misalignment/immseg_sequence.json \
        anchor2=runs/misalignment/immseg_anchor2_sequence.json [--conditions "misaligned + affine"]

Each argument is ``label=file`` (or a file, labelled by its name) written by
:mod:`bench.bench_misalignment`. One row per file: its aligned Dice, then per condition the loss
against aligned, each cell "a / b / c / d / e" over the evaluation groups (Dice points).
Conditions default to those of the first file; a file without one shows "-".

Rows compare only when their draws do: files that differ in the cases' count, ``--per`` or
``--strength`` are refused with an error naming them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.measure import print_lines

#: What must agree between two files for their rows to compare.
DRAW_KEYS = ("cases", "per", "strength")


def read_bench(path: Path) -> dict:
    """One bench_misalignment JSON (its groups, Dice table and losses)."""
    try:
        bench = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not readable as JSON ({error})") from error
    missing = [key for key in (*DRAW_KEYS, "groups", "dice_percent", "loss_vs_aligned")
               if not isinstance(bench, dict) or key not in bench]
    if missing:
        raise ValueError(f"{path}: not a bench_misalignment result (no {', '.join(missing)})")
    return bench


def cell(values: dict[str, float] | None, groups: list[str]) -> str:
    """``values`` (group -> Dice points) as "a / b / ..." in ``groups`` order; "-" if absent."""
    if values is None:
        return "-"
    return " / ".join(f"{values[group]:.1f}" for group in groups)


def misalignment_table(benches: dict[str, dict], conditions: list[str] | None = None) -> str:
    """The markdown table (see the module docstring)."""
    first_label, first = next(iter(benches.items()))
    for label, bench in benches.items():
        differing = [key for key in DRAW_KEYS if bench[key] != first[key]]
        if differing:
            raise ValueError(
                f"{label} and {first_label} differ in {', '.join(differing)} "
                f"({', '.join(f'{key} {bench[key]!r} vs {first[key]!r}' for key in differing)})"
                ": their rows do not compare")
    groups = first["groups"]
    conditions = conditions or list(first["loss_vs_aligned"])
    header = ["model", "aligned Dice", *(f"loss, {condition}" for condition in conditions)]
    lines = [f"Groups: {' / '.join(groups)}; {first['cases']} cases, per {first['per']}, "
             f"strength {first['strength']:g}.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, bench in benches.items():
        cells = [cell(bench["dice_percent"]["aligned"], groups),
                 *(cell(bench["loss_vs_aligned"].get(condition), groups)
                   for condition in conditions)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benches", nargs="+", help="label=file.json, or file.json")
    parser.add_argument("--conditions", nargs="+", default=None,
                        help="the conditions to show, each one argument (their names hold "
                        "commas, e.g. 'misaligned + affine, ngf metric'; default: the first "
                        "file's)")
    args = parser.parse_args(argv)

    def table() -> list[str]:
        benches = {}
        for text in args.benches:
            label, _, file = text.rpartition("=")
            benches[label or Path(file).stem] = read_bench(Path(file))
        return [misalignment_table(benches, args.conditions)]

    return print_lines(table)


if __name__ == "__main__":
    sys.exit(main())
