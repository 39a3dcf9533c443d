"""Apply docs/misalignment.md's pre-registered rule: does a candidate replace immseg's defaults?

    python -m bench.misalignment_decision --folder runs/misalignment \
        immseg immseg_anchor2 immseg_anchor2_jitter

The first model is the reference (today's defaults), the others candidates. Each model needs two
:mod:`bench.bench_misalignment` results in ``--folder``, written by ``make myops_misalignment``:
``<model>_sequence.json`` (one whole-volume draw per sequence) and ``<model>_slice.json`` (one
draw per slice), over the same cases and draws as the reference's.

The rule, written down before the cross-validations it judges were finished. A candidate passes
if, over the out-of-fold cases:

1. its aligned Dice is at most 1 point below the reference's in scar+edema and in the whole
   myocardium, and at most 2 points below in every group;
2. its loss to misalignment with the affine step is lower than the reference's in every group,
   for the whole-volume draw and for the per-slice draw.

Among the candidates that pass, the highest aligned scar+edema Dice wins; if none passes the
defaults stay. The issue's own goal, a loss under 1 point in every group, is reported for every
model and both draws either way.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench.measure import print_lines
from bench.misalignment_table import DRAW_KEYS, read_bench

#: The condition whose loss the rule compares.
REGISTERED = "misaligned + affine"
#: Groups held to the tighter aligned-Dice margin.
KEY_GROUPS = ("scar+edema", "whole myocardium")
KEY_MARGIN = 1.0
ANY_MARGIN = 2.0
GOAL = 1.0
DRAWS = ("sequence", "slice")


@dataclass
class Verdict:
    """One candidate against the reference: the rule's failed checks (empty: it passes)."""

    model: str
    aligned_scar_edema: float
    failures: list[str] = field(default_factory=list)

    @property
    def passes(self) -> bool:
        return not self.failures


def _read(folder: Path, model: str) -> dict[str, dict]:
    return {draw: read_bench(folder / f"{model}_{draw}.json") for draw in DRAWS}


def _check_same_draws(reference: str, benches: dict[str, dict[str, dict]]) -> None:
    for model, draws in benches.items():
        for draw, bench in draws.items():
            first = benches[reference][draw]
            differing = [key for key in DRAW_KEYS if bench[key] != first[key]]
            if differing:
                raise ValueError(f"{model}_{draw} and {reference}_{draw} differ in "
                                 f"{', '.join(differing)}: the rule compares equal draws only")
            if REGISTERED not in bench["loss_vs_aligned"]:
                raise ValueError(f"{model}_{draw}: no '{REGISTERED}' condition")


def judge(reference: dict[str, dict], candidate: dict[str, dict], model: str) -> Verdict:
    """The rule's two parts for one candidate (see the module docstring)."""
    groups = reference["sequence"]["groups"]
    ref_aligned = reference["sequence"]["dice_percent"]["aligned"]
    aligned = candidate["sequence"]["dice_percent"]["aligned"]
    verdict = Verdict(model, aligned["scar+edema"])
    for group in groups:
        margin = KEY_MARGIN if group in KEY_GROUPS else ANY_MARGIN
        drop = ref_aligned[group] - aligned[group]
        if drop > margin:
            verdict.failures.append(f"aligned {group} {drop:.1f} points below (limit {margin:g})")
    for draw in DRAWS:
        ref_loss = reference[draw]["loss_vs_aligned"][REGISTERED]
        loss = candidate[draw]["loss_vs_aligned"][REGISTERED]
        for group in groups:
            if not loss[group] < ref_loss[group]:
                verdict.failures.append(f"per {draw} + affine: {group} loses {loss[group]:.1f}, "
                                        f"not less than {ref_loss[group]:.1f}")
    return verdict


def goal_misses(bench: dict) -> dict[str, list[str]]:
    """condition -> the groups whose loss is 1 point or more (the issue's goal is under 1)."""
    return {condition: [group for group in bench["groups"] if losses[group] >= GOAL]
            for condition, losses in bench["loss_vs_aligned"].items()}


def decide(folder: Path, models: list[str]) -> tuple[list[Verdict], str | None, list[str]]:
    """(each candidate's verdict, the winner or None, the report's lines)."""
    benches = {model: _read(folder, model) for model in models}
    reference, *candidates = models
    _check_same_draws(reference, benches)
    verdicts = [judge(benches[reference], benches[model], model) for model in candidates]
    passing = [verdict for verdict in verdicts if verdict.passes]
    winner = max(passing, key=lambda verdict: verdict.aligned_scar_edema).model \
        if passing else None
    lines = [f"Reference {reference}; {benches[reference]['sequence']['cases']} cases; "
             f"loss compared: {REGISTERED}."]
    for verdict in verdicts:
        state = "passes" if verdict.passes else "fails"
        lines.append(f"- {verdict.model} {state} (aligned scar+edema "
                     f"{verdict.aligned_scar_edema:.1f})")
        lines.extend(f"    {failure}" for failure in verdict.failures)
    lines.append(f"Decision: {winner} replaces {reference}'s defaults." if winner else
                 f"Decision: no candidate passes; {reference}'s defaults stay.")
    lines.append(f"Goal (loss under {GOAL:g} point in every group):")
    for model in models:
        for draw in DRAWS:
            for condition, misses in goal_misses(benches[model][draw]).items():
                lines.append(f"- {model}, per {draw}, {condition}: "
                             + ("met" if not misses else "missed in " + ", ".join(misses)))
    return verdicts, winner, lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="the reference, then the candidates")
    parser.add_argument("--folder", default="runs/misalignment")
    args = parser.parse_args(argv)
    if len(args.models) < 2:
        parser.error("name the reference and at least one candidate")
    return print_lines(lambda: decide(Path(args.folder), args.models)[2])


if __name__ == "__main__":
    sys.exit(main())
