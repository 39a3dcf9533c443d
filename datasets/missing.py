"""Training cases with missing sequences: the record, and PASSION-style imbalanced draws.

Clinics rarely acquire bSSFP, LGE and T2w for every patient. A *missing file* (JSON) names, per
case, the sequences it lacks::

    {"format": "immseg-missing-sequences", "version": 1,
     "rates": {"bSSFP": 0.2, "LGE": 0.4, "T2w": 0.6}, "seed": 0,
     "absent": {"Case3002": ["T2w"], "Case3004": ["LGE", "T2w"], ...}}

``preprocess_data.py --allow_missing`` writes one for the cases of a processed root that really
lack a sequence (``<root>/missing.json``, applied by train.py by itself); ``train.py
--missing_file`` adds another (an experiment's draw). Either way every slice of a listed case
has those channels zeroed and marked absent in its ``sequence_mask`` in every epoch (sequence
dropout, when also on, draws only among the sequences the case has). Cases not listed have
everything. The label is kept: the segmentation target does not depend on which sequences were
acquired.

:func:`draw_missing` makes such a file for experiments, in the spirit of PASSION and DMAF-Net's
imbalanced missing rates: sequence ``s`` is absent from exactly ``round(rate_s * n)`` of the ``n``
training cases, drawn with a fixed seed, and no case loses every sequence.

    python -m datasets.missing --root data/myops2020 --rates bSSFP=0.2,LGE=0.4,T2w=0.6 \
        --seed 0 --out data/myops2020/missing/passion.json [--list_dir LISTS | --all_cases]

Drawn over the cases of a training list (default ``<root>/lists``), the rates are exact for that
run; drawn over every case (``--all_cases``), one file serves all folds of a cross-validation and
each fold's training cases lack their sequences at close to the rates.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from datasets.labels import MODALITIES
from datasets.processed import ProcessedLayout, case_of
from utils import setup_logging, write_json

log = logging.getLogger("missing")

FORMAT = "immseg-missing-sequences"
VERSION = 1
#: Where preprocess_data.py --allow_missing records the cases of a processed root that lack a
#: sequence; train.py applies it by itself.
DATASET_MISSING_FILE = "missing.json"


class MissingFileError(ValueError):
    """A missing file that cannot be used (the message names it)."""


@dataclass(frozen=True)
class MissingSequences:
    """Per case, the sequences it lacks (cases not listed have all of ``sequences``)."""

    absent: Mapping[str, tuple[str, ...]]
    sequences: tuple[str, ...] = MODALITIES
    rates: Mapping[str, float] = field(default_factory=dict)
    seed: int | None = None

    def __post_init__(self) -> None:
        cleaned = {}
        for case, names in self.absent.items():
            names = tuple(names)
            unknown = sorted(set(names) - set(self.sequences))
            if unknown:
                raise ValueError(f"case {case}: unknown sequence(s) {unknown}; known "
                                 f"{list(self.sequences)}")
            if len(set(names)) == len(self.sequences):
                raise ValueError(f"case {case}: every sequence absent; a case needs at least one")
            if names:
                cleaned[str(case)] = tuple(s for s in self.sequences if s in names)
        object.__setattr__(self, "absent", dict(sorted(cleaned.items())))

    def presence(self, name: str) -> np.ndarray:
        """``[S]`` bool for a case or one of its slices (``Case_slice003``)."""
        missing = self.absent.get(case_of(name), ())
        return np.array([s not in missing for s in self.sequences], dtype=bool)

    def union(self, other: MissingSequences) -> MissingSequences:
        """Both records' absences per case (the data's own and a drawn experiment's)."""
        cases = set(self.absent) | set(other.absent)
        return MissingSequences({case: tuple(set(self.absent.get(case, ()))
                                             | set(other.absent.get(case, ())))
                                 for case in cases}, self.sequences,
                                dict(other.rates or self.rates), other.seed)

    def counts(self, cases: Iterable[str] | None = None) -> dict[str, int]:
        """How many cases lack each sequence: of ``cases``, or of those listed."""
        chosen = self.absent if cases is None else set(cases)
        return {s: sum(s in self.absent.get(case, ()) for case in chosen)
                for s in self.sequences}

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "sequences": list(self.sequences),
                "rates": dict(self.rates), "seed": self.seed,
                "absent": {case: list(names) for case, names in self.absent.items()}}

    def write(self, path: str | Path) -> Path:
        write_json(path, self.to_json())
        return Path(path)

    @classmethod
    def read(cls, path: str | Path) -> MissingSequences:
        path = Path(path)
        try:
            payload = json.loads(path.read_text())
        except OSError as error:
            raise MissingFileError(f"{path}: cannot read the missing file ({error})") from error
        except ValueError as error:
            raise MissingFileError(f"{path}: not JSON ({error})") from error
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise MissingFileError(f"{path}: not a missing-sequences file (format {FORMAT!r})")
        if payload.get("version") != VERSION:
            raise MissingFileError(f"{path}: version {payload.get('version')!r} is not "
                                   f"supported (expected {VERSION})")
        try:
            return cls(absent=payload["absent"],
                       sequences=tuple(payload.get("sequences", MODALITIES)),
                       rates=payload.get("rates", {}), seed=payload.get("seed"))
        except (KeyError, TypeError, ValueError) as error:
            raise MissingFileError(f"{path}: {error}") from error


def draw_missing(case_ids: Iterable[str], rates: Mapping[str, float], seed: int,
                 sequences: Sequence[str] = MODALITIES) -> MissingSequences:
    """Sequence ``s`` absent from exactly ``round(rates[s] * n)`` of the ``n`` cases.

    Sequences are drawn in order of decreasing rate, each among the cases that would still keep
    at least one sequence, so no case loses everything; a draw that cannot honour that is an
    error. A pure function of the sorted case ids, the rates and ``seed``.
    """
    cases = sorted(set(case_ids))
    if not cases:
        raise ValueError("no cases to draw from")
    unknown = sorted(set(rates) - set(sequences))
    if unknown:
        raise ValueError(f"unknown sequence(s) {unknown}; known {list(sequences)}")
    for name, rate in rates.items():
        if not 0.0 <= float(rate) < 1.0:
            raise ValueError(f"missing rate of {name} must lie in [0, 1), got {rate}")
    rng = np.random.default_rng(seed)
    absent: dict[str, list[str]] = {case: [] for case in cases}
    for name in sorted(rates, key=lambda s: (-rates[s], sequences.index(s))):
        count = round(float(rates[name]) * len(cases))
        eligible = [case for case in cases if len(absent[case]) < len(sequences) - 1]
        if count > len(eligible):
            raise ValueError(f"rates {dict(rates)} leave some case without any sequence "
                             f"({name}: {count} cases needed, {len(eligible)} possible)")
        for index in rng.choice(len(eligible), size=count, replace=False):
            absent[eligible[int(index)]].append(name)
    return MissingSequences(absent={case: tuple(names) for case, names in absent.items()},
                            sequences=tuple(sequences),
                            rates={k: float(v) for k, v in rates.items()}, seed=seed)


def parse_rates(text: str) -> dict[str, float]:
    """``bSSFP=0.2,LGE=0.4,T2w=0.6`` -> ``{"bSSFP": 0.2, ...}``."""
    rates = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{item!r}: expected SEQUENCE=RATE")
        try:
            rates[name.strip()] = float(value)
        except ValueError as error:
            raise ValueError(f"{item!r}: rate is not a number") from error
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="processed data root")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--list_dir", default=None,
                       help="lists folder whose train.txt names the training cases (default: "
                            "<root>/lists; a fold's for cross-validation)")
    where.add_argument("--all_cases", action="store_true",
                       help="every case of the root (one file for all folds)")
    parser.add_argument("--rates", required=True, help="e.g. bSSFP=0.2,LGE=0.4,T2w=0.6")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="missing file to write (JSON)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        layout = ProcessedLayout(Path(args.root),
                                 list_dir=Path(args.list_dir) if args.list_dir else None)
        cases = (layout.case_ids() if args.all_cases
                 else {case_of(name) for name in layout.names("train", create=False)})
        drawn = draw_missing(cases, parse_rates(args.rates), args.seed)
        drawn.write(args.out)
    except (ValueError, OSError) as error:
        log.error("%s", error)
        return 1
    log.info("%s: %d training cases; absent per sequence %s", args.out, len(cases),
             drawn.counts())
    return 0


if __name__ == "__main__":
    sys.exit(main())
