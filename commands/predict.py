"""Segment a new patient: native bSSFP / LGE / T2w NIfTI in, a native label NIfTI out.

    python predict.py --checkpoint runs/r50_vitb16/checkpoint_final.pth \
        --bssfp bssfp.nii.gz --lge lge.nii.gz --t2w t2w.nii.gz --out pred.nii.gz
    python predict.py --run_dir runs/r50_vitb16 --case_dir /data/MyoPS2020/Case3001 \
        --out pred.nii.gz --save_probabilities
    python predict.py --run_dir runs/myops2020_cv/immseg --case_dir /data/new_cases \
        --out_dir predictions/                   # every case; the 5 folds as one ensemble
    python predict.py --run_dir runs/r50_vitb16 --bssfp cine_4d.nii.gz --cine_frame 0 \
        --lge lge.nii.gz --t2w t2w.nii.gz --out pred.nii.gz   # one frame of a 4D cine

Any subset of the sequences may be given (absent ones are zeroed and masked, as in training with
sequence dropout). The label map (0 background, 1 myocardium, 2 scar, 3 edema) has the shape and
affine of the LGE volume (of the reference sequence when LGE is absent), so it opens aligned over
it in ITK-SNAP; a JSON record with the heart centre, ROI and slices used is written beside it.
The inputs are prepared exactly as test.py prepares held-out volumes and, by default, registered
as the training data were (--register off turns that off). Outputs never replace an input file,
and existing outputs are kept unless --overwrite is given.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from commands.options import (
    add_checkpoint_arguments,
    add_prediction_arguments,
    checkpoint_paths,
    load_models,
    predict_config,
)
from datasets.labels import MODALITIES
from datasets.raw import discover_cases
from networks.sequences import parse_sequences
from networks.variants import describe
from prediction.inputs import case_dir_files, load_patient
from prediction.pipeline import (
    output_paths,
    predict_patient,
    registration_networks,
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
    parser.add_argument("--cine_frame", type=int, default=None,
                        help="the bSSFP is a 4D cine series: read this frame of it (0-based, "
                             "in file order; end-diastole is usually frame 0 of an ECG-triggered "
                             "cine). MyoPS gives one frame per case")
    parser.add_argument("--sequences", default=None,
                        help=f"comma-separated subset to use, e.g. LGE,T2w (default: all given; "
                             f"known: {','.join(MODALITIES)})")
    out = parser.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", help="output label map (.nii.gz or .nii)")
    out.add_argument("--out_dir",
                     help="with a --case_dir root: one <case>.nii.gz (and .json) per case here")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing outputs (never an input file)")
    parser.add_argument("--save_probabilities", action="store_true",
                        help="also write <out>_probabilities.nii.gz (float32, 4 classes)")
    parser.add_argument("--pixel_spacing_mm", type=float, default=None,
                        help="grid pixel size (default: the training data's, else 1.0)")
    parser.add_argument("--crop_size", type=int, default=None,
                        help="grid side in pixels (default: the training data's, else 224)")
    parser.add_argument("--roi_size", type=int, default=None,
                        help="ROI side in pixels (default: the training data's, else 128)")
    add_prediction_arguments(parser)
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


def _cases(args: argparse.Namespace) -> list[tuple[str | None, dict, Path]]:
    """``(case id, sequence files, output path)`` for every case to predict."""
    if args.out_dir is None:
        case_id, files = _input_files(args)
        return [(case_id, files, Path(args.out))]
    if args.case_dir is None or args.case_id is not None or any(
            getattr(args, flag) is not None for flag in _FILE_FLAGS.values()):
        raise ValueError("--out_dir takes a --case_dir root (all its cases), without --case_id "
                         "or sequence files")
    wanted = parse_sequences(args.sequences) if args.sequences else None
    found = discover_cases(args.case_dir, require_label=False,
                           required=() if wanted is None else wanted)
    return [(case.case_id, {name: path for name, path in case.images.items()
                            if wanted is None or name in wanted},
             Path(args.out_dir) / f"{case.case_id}.nii.gz") for case in found]


def _check_outputs(out: Path, inputs: list[Path], save_probabilities: bool,
                   overwrite: bool) -> None:
    """Refuse an output that is an input, and existing outputs unless ``overwrite``."""
    paths = output_paths(out)
    written = [paths["labels"], paths["record"]] + (
        [paths["probabilities"]] if save_probabilities else [])
    sources = {path.resolve() for path in inputs}
    clash = [str(path) for path in written if path.resolve() in sources]
    if clash:
        raise ValueError(f"{clash[0]}: is an input of this prediction; choose another --out")
    existing = [str(path) for path in written if path.exists()]
    if existing and not overwrite:
        raise ValueError(f"{existing[0]}: exists (pass --overwrite to replace it)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        cases = _cases(args)
        for _, files, out in cases:
            _check_outputs(out, [Path(p) for p in files.values() if p is not None],
                           args.save_probabilities, args.overwrite)
        device = resolve_device(args.device)
        paths = checkpoint_paths(args)
        loaded = load_models(args, paths, device)
        config, source = predict_config(args, loaded.payload, {
            "pixel_spacing_mm": args.pixel_spacing_mm, "crop_size": args.crop_size,
            "roi_size": args.roi_size})
        preprocess = config.preprocess
        log.info("%s; preprocessing from %s", describe(loaded.model), source)
        if source == "defaults":
            log.warning("the training data's manifests were not found: using the default "
                        "geometry (%s mm, crop %d, ROI %d); pass --pixel_spacing_mm, "
                        "--crop_size, --roi_size if the model was trained on another",
                        preprocess.pixel_spacing_mm, preprocess.crop_size, preprocess.roi_size)
        networks = registration_networks(loaded.payload, preprocess, device, args.segmenter)
        for case_id, files, out in cases:
            patient = load_patient(files, case_id, args.cine_frame)
            prediction = predict_patient(loaded.model, loaded.img_size, patient, config, device,
                                         networks)
            written = write_prediction(prediction, out, args.save_probabilities)
            _report(patient.case_id, prediction.record, written)
    except (ValueError, OSError) as error:
        log.error("%s", error)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted; the cases already written are complete, no other was written")
        return 130
    return 0


def _report(case_id: str, record: dict, written: dict) -> None:
    heart = record["heart"]
    print(f"{case_id}: {', '.join(record['sequences_present'])} -> {written['labels']} "
          f"(on {record['output_sequence']}, slices {record['output_slices_used']}); heart "
          f"centre {[round(v, 1) for v in heart['centre_world_mm']]} mm"
          f"{'' if heart['found'] else ' (not found: grid centre used)'}; "
          f"{record['seconds']:.1f} s")
    volumes, burden = record["group_volume_ml"], record["burden_percent"]
    shares = {name: "-" if value is None else f"{value:.1f} % of the myocardium"
              for name, value in burden.items()}
    print(f"  whole myocardium {volumes['whole myocardium']:.1f} mL; scar "
          f"{volumes['scar']:.1f} mL ({shares['scar burden']}); scar+edema "
          f"{volumes['scar+edema']:.1f} mL ({shares['scar+edema burden']})")


if __name__ == "__main__":
    sys.exit(main())
