"""Preprocessing speed: seconds per case of the full pipeline, as ``preprocess_data.py`` runs it.

    python -m bench.bench_preprocess --cases 8                       # phantom cases, all steps
    python -m bench.bench_preprocess --raw_root ../shared/data/myops2020 --no_affine --no_nonrigid

Runs :func:`preprocessing.runner.run_preprocessing` into a temporary folder (nothing is kept),
on ``--raw_root`` or on ``--cases`` phantom cases written first. Per case it times steps 1-3
(slice matching, resampling, normalisation, affine registration) plus the non-rigid step, ROI
crop and writing, as the runner reports them; the non-rigid network's training is counted once
in the wall time, not per case (the 5 s target excludes it). Prints one JSON document.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.measure import print_report
from datasets.phantom import write_phantom_dataset
from preprocessing.pipeline import AFFINE_METRICS, PreprocessConfig
from preprocessing.runner import RunOptions, run_preprocessing
from preprocessing.voxelmorph_net import VoxelMorphConfig

#: Seconds per case the preprocessing should stay under (non-rigid training excluded).
TARGET_SECONDS = 5.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw_root", type=Path, default=None,
                        help="raw dataset to time (default: --cases phantom cases)")
    parser.add_argument("--cases", type=int, default=8, help="phantom cases to write")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--no_affine", action="store_true")
    parser.add_argument("--affine_metric", choices=AFFINE_METRICS,
                        default=PreprocessConfig().affine_metric)
    parser.add_argument("--segmenter", type=Path, default=None,
                        help="checkpoint for --affine_metric segmentation")
    parser.add_argument("--no_nonrigid", action="store_true")
    parser.add_argument("--voxelmorph_iterations", type=int,
                        default=VoxelMorphConfig().iterations)
    parser.add_argument("--no_qa", action="store_true", help="skip the QA pictures")
    return parser


def bench(args: argparse.Namespace) -> dict[str, Any]:
    config = PreprocessConfig(affine_registration=not args.no_affine,
                              affine_metric=args.affine_metric,
                              nonrigid_registration=not args.no_nonrigid)
    options = RunOptions(workers=args.workers, qa=not args.no_qa, overwrite=True,
                         segmenter_checkpoint=args.segmenter,
                         voxelmorph=dataclasses.replace(VoxelMorphConfig(),
                                                        iterations=args.voxelmorph_iterations))
    with tempfile.TemporaryDirectory() as tmp:
        raw = args.raw_root
        if raw is None:
            raw = Path(tmp) / "raw"
            write_phantom_dataset(raw, args.cases)
        start = time.perf_counter()
        results = run_preprocessing(raw, Path(tmp) / "processed", config, options)
        wall = time.perf_counter() - start
    seconds = [result.seconds for result in results]
    mean = statistics.fmean(seconds)
    return {
        "source": str(args.raw_root) if args.raw_root is not None else f"phantom x{args.cases}",
        "cases": len(results),
        "slices": sum(result.num_slices for result in results),
        "seconds_per_case": {"mean": mean, "median": statistics.median(seconds),
                             "max": max(seconds)},
        "target_seconds_per_case": TARGET_SECONDS,
        "meets_target": mean < TARGET_SECONDS,
        "wall_seconds": wall,
        "workers": args.workers,
        "steps": {"affine": config.affine_registration,
                  "affine_metric": config.affine_metric if config.affine_registration else None,
                  "nonrigid": config.nonrigid_registration,
                  "voxelmorph_iterations": (args.voxelmorph_iterations
                                            if config.nonrigid_registration else None),
                  "qa_pictures": options.qa},
        "machine": platform.processor() or platform.machine(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cases < 1 or args.workers < 1:
        print("error: --cases and --workers must be >= 1", file=sys.stderr)
        return 1
    return print_report(lambda: bench(args))


if __name__ == "__main__":
    sys.exit(main())
