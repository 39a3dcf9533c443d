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

from datasets.processed import DEFAULT_PROCESSED_ROOT
from datasets.raw import DEFAULT_RAW_ROOT
from preprocessing.pipeline import AFFINE_METRICS, PreprocessConfig
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
    parser.add_argument("--layout", choices=("myops380", "myops2020"), default=None,
                        help="raw layout (default: detected)")
    parser.add_argument("--test_every", type=int, default=5,
                        help="the release's split: sorted cases [0::N] are listed as test "
                             "volumes (case0001, case0006, ... for 5); 0 = none")
    parser.add_argument("--folds", type=int, default=5,
                        help="also write the lists of K-fold cross-validation (lists/cv<K>/"
                             "fold<k>/, round-robin on sorted cases; 0 = none). Every case is "
                             "written both as training slices and as a label-free test volume")
    parser.add_argument("--max_slice_distance", type=float, default=5.0,
                        help="mm; reference slices without partners this close are dropped")
    parser.add_argument("--crop_size", type=int, default=224)
    parser.add_argument("--roi_size", type=int, default=128)
    parser.add_argument("--no_affine", action="store_true", help="skip affine registration")
    parser.add_argument("--affine_metric", choices=AFFINE_METRICS,
                        default=PreprocessConfig().affine_metric,
                        help="consensus (default): the mean of NGF to the image, NGF to the "
                             "label and MI (closest on real MyoPS slices, about 4 s per case); "
                             "ngf: edge directions (robust to the sequences' contrasts); "
                             "mattes: mutual information (closer on simple contrasts); "
                             "segmentation: each sequence's myocardium as predicted by "
                             "--segmenter, laid onto the label's")
    parser.add_argument("--segmenter", type=Path, default=None,
                        help="checkpoint of a network that segments one sequence alone (trained "
                             "with --sequence_dropout) for --affine_metric segmentation")
    parser.add_argument("--no_nonrigid", action="store_true",
                        help="skip VoxelMorph-style non-rigid registration")
    parser.add_argument("--voxelmorph_checkpoint", type=Path, default=None,
                        help="non-rigid model to reuse or to train into "
                             "(default: <out_root>/voxelmorph.pth)")
    parser.add_argument("--voxelmorph_iterations", type=int,
                        default=VoxelMorphConfig().iterations)
    parser.add_argument("--no_qa", action="store_true", help="skip the QA pictures")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes")
    parser.add_argument("--device", default="cpu",
                        help="device for the non-rigid and segmenter networks")
    parser.add_argument("--overwrite", action="store_true", help="redo finished cases")
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
    if (args.segmenter is not None) != (args.affine_metric == "segmentation"
                                        and not args.no_affine):
        log.error("--segmenter and --affine_metric segmentation go together")
        return 1
    try:
        config = PreprocessConfig(crop_size=args.crop_size, roi_size=args.roi_size,
                                  max_slice_distance_mm=args.max_slice_distance,
                                  affine_registration=not args.no_affine,
                                  affine_metric=args.affine_metric,
                                  nonrigid_registration=not args.no_nonrigid)
        options = RunOptions(
            test_every=args.test_every, folds=args.folds, workers=args.workers,
            overwrite=args.overwrite,
            layout=args.layout, qa=not args.no_qa,
            voxelmorph=dataclasses.replace(VoxelMorphConfig(),
                                           iterations=args.voxelmorph_iterations),
            voxelmorph_checkpoint=args.voxelmorph_checkpoint,
            segmenter_checkpoint=args.segmenter, device=args.device)
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
