"""Write synthetic multi-sequence CMR phantom cases (the framework's embedded default data).

    python make_phantom.py --out data/phantom --cases 15
"""

from __future__ import annotations

import argparse
import logging
import sys

from datasets.phantom import write_phantom_dataset
from datasets.phantom_config import PhantomConfig
from utils import setup_logging

log = logging.getLogger("make_phantom")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/phantom", help="dataset root (Raw_data inside)")
    parser.add_argument("--cases", type=int, default=15, help="number of cases")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--overwrite", action="store_true", help="rewrite existing cases")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        if args.cases < 1:
            raise ValueError(f"--cases must be >= 1, got {args.cases}")
        case_ids = write_phantom_dataset(args.out, args.cases, seed=args.seed,
                                         config=PhantomConfig(), overwrite=args.overwrite)
    except (ValueError, OSError) as error:
        log.error("%s", error)
        return 1
    log.info("%d phantom cases in %s/Raw_data", len(case_ids), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
