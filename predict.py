"""Segment a new patient: native bSSFP / LGE / T2w NIfTI in, a native label NIfTI out.

    python predict.py --checkpoint runs/r50_vitb16/checkpoint_final.pth \
        --bssfp bssfp.nii.gz --lge lge.nii.gz --t2w t2w.nii.gz --out pred.nii.gz
    python predict.py --run_dir runs/r50_vitb16 --case_dir /data/MyoPS2020/Case3001 \
        --out pred.nii.gz --save_probabilities

Any subset of the sequences may be given (absent ones are zeroed and masked, as in training with
sequence dropout). The label map (0 background, 1 myocardium, 2 scar, 3 edema) has the shape and
affine of the LGE volume (of the reference sequence when LGE is absent), so it opens aligned over
it in ITK-SNAP; a JSON record with the heart centre, ROI and slices used is written beside it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from datasets.labels import MODALITIES
from evaluation.evaluate import add_checkpoint_arguments, checkpoint_path, load_checkpoint
from networks.sequences import parse_sequences
from networks.variants import describe
from prediction.inputs import case_dir_files, load_patient
from prediction.localisation import WEIGHTINGS
from prediction.pipeline import (
    PredictConfig,
    output_paths,
    predict_patient,
    preprocess_config_for,
    write_prediction,
)
from utils import resolve_device, setup_logging

log = logging.getLogger("predict")

_FILE_FLAGS = {"bSSFP": "bssfp", "LGE": "lge", "T2w": "t2w"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(parser)
    for name, flag in _FILE_FLAGS.items():
        parser.add_argument(f"--{flag}", default=None, help=f"{name} NIfTI volume")
    parser.add_argument("--case_dir", default=None,
                        help="raw case folder (MyoPS 2020 CaseXXXX/ or a dataset root of either "
                             "raw layout) instead of the file flags")
    parser.add_argument("--case_id", default=None, help="case to take from a --case_dir root")
    parser.add_argument("--sequences", default=None,
                        help=f"comma-separated subset to use, e.g. LGE,T2w (default: all given; "
                             f"known: {','.join(MODALITIES)})")
    parser.add_argument("--out", required=True, help="output label map (.nii.gz or .nii)")
    parser.add_argument("--save_probabilities", action="store_true",
                        help="also write <out>_probabilities.nii.gz (float32, 4 classes)")
    parser.add_argument("--register", action="store_true",
                        help="affinely register the other sequences onto the reference, using "
                             "the first-pass myocardium as the metric mask, then predict again")
    parser.add_argument("--stride", type=int, default=48, help="localisation window step (px)")
    parser.add_argument("--weighting", choices=WEIGHTINGS, default="gaussian",
                        help="how overlapping localisation windows are averaged")
    parser.add_argument("--pixel_spacing_mm", type=float, default=None,
                        help="grid pixel size (default: the training data's, else 1.0)")
    parser.add_argument("--crop_size", type=int, default=None,
                        help="grid side in pixels (default: the training data's, else 224)")
    parser.add_argument("--roi_size", type=int, default=None,
                        help="ROI side in pixels (default: the training data's, else 128)")
    parser.add_argument("--batch_size", type=int, default=32, help="windows per forward pass")
    parser.add_argument("--device", default="auto")
    return parser


def _input_files(args: argparse.Namespace) -> tuple[str | None, dict[str, str | Path | None]]:
    given = {name: getattr(args, flag) for name, flag in _FILE_FLAGS.items()}
    if args.case_dir is not None:
        if any(path is not None for path in given.values()):
            raise ValueError("give either --case_dir or the sequence files, not both")
        wanted = parse_sequences(args.sequences) if args.sequences else None
        case_id, files = case_dir_files(args.case_dir, args.case_id, wanted)
        return case_id, dict(files)
    if args.case_id is not None:
        raise ValueError("--case_id needs --case_dir")
    if args.sequences:
        wanted = parse_sequences(args.sequences)
        missing = [name for name in wanted if given[name] is None]
        if missing:
            raise ValueError(f"--sequences names {missing} but no file was given for them")
        given = {name: path for name, path in given.items() if name in wanted}
    if all(path is None for path in given.values()):
        raise ValueError("no input sequence given: pass --lge (and/or --bssfp, --t2w) or "
                         "--case_dir")
    return None, given


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    checkpoint = checkpoint_path(args)
    setup_logging()
    try:
        output_paths(args.out)  # a bad name fails before any work
        case_id, files = _input_files(args)
        patient = load_patient(files, case_id)
        device = resolve_device(args.device)
        loaded = load_checkpoint(checkpoint, device)
        preprocess, source = preprocess_config_for(
            loaded.payload, {"pixel_spacing_mm": args.pixel_spacing_mm,
                             "crop_size": args.crop_size, "roi_size": args.roi_size})
        config = PredictConfig(preprocess=preprocess, stride=args.stride,
                               weighting=args.weighting, register=args.register,
                               batch_size=args.batch_size)
        log.info("%s; preprocessing geometry from %s", describe(loaded.model), source)
        if source == "defaults":
            log.warning("the training data's manifests were not found: using the default "
                        "geometry (%s mm, crop %d, ROI %d); pass --pixel_spacing_mm, "
                        "--crop_size, --roi_size if the model was trained on another",
                        preprocess.pixel_spacing_mm, preprocess.crop_size, preprocess.roi_size)
        prediction = predict_patient(loaded.model, loaded.img_size, patient, config, device)
        written = write_prediction(prediction, args.out, args.save_probabilities)
    except (ValueError, OSError) as error:
        log.error("%s", error)
        return 1
    record = prediction.record
    heart = record["heart"]
    print(f"{patient.case_id}: {', '.join(record['sequences_present'])} -> {written['labels']} "
          f"(on {record['reference']}, slices {record['reference_slices_used']}); heart centre "
          f"{[round(v, 1) for v in heart['centre_world_mm']]} mm"
          f"{'' if heart['found'] else ' (not found: grid centre used)'}; "
          f"{record['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
