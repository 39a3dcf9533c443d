"""Raw multi-sequence CMR NIfTI -> the seed's processed layout (train_npz / test_vol_h5).

    python preprocess_data.py --raw_root data/phantom --out_root data/phantom/Processed_data

Steps: slice matching, 1 mm resampling + centre crop + normalisation, myocardium-guided affine
registration, VoxelMorph-style non-rigid registration (trained on the data's own pairs, its
checkpoint reused), ROI crop; a manifest, the sampling fields and a QA picture per case.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from commands.config_flags import add_config_arguments, given_values
from datasets.processed import DEFAULT_PROCESSED_ROOT
from datasets.raw import DEFAULT_RAW_ROOT
from preprocessing.pipeline import PreprocessConfig
from preprocessing.runner import RunOptions, run_preprocessing
from preprocessing.voxelmorph_net import VoxelMorphConfig
from utils import setup_logging

log = logging.getLogger("preprocess_data")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw_root", default=DEFAULT_RAW_ROOT,
                        help="raw dataset: its Raw_data folder or the folder holding it "
                             "(MyoPS380 layout), or a MyoPS 2020 folder (default: %(default)s, "
                             "where the release's README puts it)")
    parser.add_argument("--out_root", default=None,
                        help="processed output (default: Processed_data beside a Raw_data "
                             f"folder, else inside --raw_root; {DEFAULT_PROCESSED_ROOT} for the "
                             "default)")
    add_config_arguments(parser.add_argument_group("what the data become (PreprocessConfig)"),
                         PreprocessConfig)
    add_config_arguments(parser.add_argument_group("how the run is carried out (RunOptions)"),
                         RunOptions)
    parser.add_argument("--voxelmorph_iterations", type=int,
                        default=VoxelMorphConfig().iterations,
                        help="training iterations of the non-rigid network (default: %(default)s)")
    return parser


def default_out_root(raw_root: str | Path) -> Path:
    """``Processed_data`` beside a ``Raw_data`` folder (the release's MyoPS380_dataset layout),
    else inside ``raw_root`` (``data/phantom`` -> ``data/phantom/Processed_data``)."""
    raw_root = Path(raw_root)
    if raw_root.name == "Raw_data":
        return raw_root.parent / "Processed_data"
    return raw_root / "Processed_data"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    out_root = args.out_root or str(default_out_root(args.raw_root))
    try:
        config = PreprocessConfig(**given_values(args, PreprocessConfig))
        options = RunOptions(**given_values(args, RunOptions), voxelmorph=dataclasses.replace(
            VoxelMorphConfig(), iterations=args.voxelmorph_iterations))
        if (options.segmenter_checkpoint is not None) != (
                config.affine_metric == "segmentation" and config.affine_registration):
            raise ValueError("--segmenter and --affine_metric segmentation go together")
        results = run_preprocessing(args.raw_root, out_root, config, options)
    except (ValueError, RuntimeError, OSError, FloatingPointError) as error:
        log.error("%s", error)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted; finished cases are kept, rerun the same command to continue")
        return 130
    done = [r for r in results if not r.skipped]
    seconds = sum(r.seconds for r in done) / max(len(done), 1)
    log.info("%d cases (%d train, %d test), %d skipped as finished, %.2f s per processed case "
             "(excluding non-rigid training) -> %s", len(results),
             sum(r.split == "train" for r in results),
             sum(r.split == "test_vol" for r in results), len(results) - len(done), seconds,
             out_root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
