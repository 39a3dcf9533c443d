"""Score a folder of native label maps against the raw labels: Dice and HD95 per group.

    python -m evaluation.score_folder --pred predictions/ --raw_root /data/MyoPS2020 \
        [--output_dir scores/]

Whatever made the label maps (predict.py --out_dir, nnU-Net, another framework), they are scored
here with the one scorer every comparison in this project uses: one label map per case named
``<case>.nii.gz`` (or ``<case>_pred.nii.gz``), on the grid of that case's raw label (same shape
and affine), in training values 0..3 or MyoPS 2020 codes. Raw labels are found as
:mod:`datasets.raw` finds them (MyoPS 2020 ``CaseXXXX_gd``, MyoPS380 ``label/caseXXXX_gt``).
HD95 uses the native voxel spacing. A prediction missing for a labelled case, or on another
grid, is an error naming the file; predictions without a label are listed and ignored.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from datasets.raw import RawDataError, discover_cases, read_volume
from evaluation.agreement import format_agreement
from evaluation.metrics import MetricAccumulator
from utils import setup_logging, write_json

log = logging.getLogger("score_folder")

_SUFFIXES = ("_pred.nii.gz", "_pred.nii", ".nii.gz", ".nii")


def prediction_files(folder: str | Path) -> dict[str, Path]:
    """``case id -> label map`` in ``folder`` (``<case>.nii.gz`` or ``<case>_pred.nii.gz``;
    probability maps and hidden files are skipped)."""
    found: dict[str, Path] = {}
    for path in sorted(Path(folder).iterdir()):
        if path.name.startswith(".") or "_probabilities" in path.name:
            continue
        suffix = next((s for s in _SUFFIXES if path.name.endswith(s)), None)
        if suffix is None:
            continue
        case = path.name[: -len(suffix)]
        if case in found:
            raise RawDataError(f"{folder}: two label maps for {case} ({found[case].name}, "
                               f"{path.name})")
        found[case] = path
    return found


def score_folder(pred_dir: str | Path, raw_root: str | Path,
                 layout: str | None = None,
                 only: Sequence[str] | None = None) -> MetricAccumulator:
    """Score every labelled case of ``raw_root`` (or the ``only`` ones) against its label map in
    ``pred_dir``."""
    predictions = prediction_files(pred_dir)
    chosen = None if only is None else set(only)
    cases = [case for case in discover_cases(raw_root, layout, require_label=False, required=())
             if case.label is not None and (chosen is None or case.case_id in chosen)]
    if not cases:
        raise RawDataError(f"{raw_root}: no labelled cases found")
    missing = [case.case_id for case in cases if case.case_id not in predictions]
    if missing:
        raise RawDataError(f"{pred_dir}: no label map for {len(missing)} labelled case(s): "
                           f"{', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}")
    extra = sorted(set(predictions) - {case.case_id for case in cases})
    if extra:
        log.warning("%s: label maps without a raw label, not scored: %s", pred_dir,
                    ", ".join(extra))
    metrics = MetricAccumulator()
    for case in cases:
        truth = read_volume(case.label, is_label=True)
        path = predictions[case.case_id]
        prediction = read_volume(path, is_label=True)
        if not prediction.same_geometry(truth):
            raise RawDataError(f"{path}: grid {prediction.array.shape} does not match the raw "
                               f"label {case.label} {truth.array.shape} (or their affines "
                               "differ); label maps must be on the native label grid")
        metrics.update(case.case_id, prediction.array, truth.array, truth.spacing)
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pred", required=True, help="folder of native label maps")
    parser.add_argument("--raw_root", required=True, help="raw dataset with the labels")
    parser.add_argument("--layout", choices=("myops380", "myops2020"), default=None,
                        help="raw layout (default: detected)")
    parser.add_argument("--output_dir", default=None,
                        help="where per_case.csv and summary.json go (default: --pred)")
    args = parser.parse_args(argv)
    setup_logging()
    output = Path(args.output_dir or args.pred)
    try:
        metrics = score_folder(args.pred, args.raw_root, args.layout)
        metrics.write_csv(output / "per_case.csv")
        results = metrics.results()
        write_json(output / "summary.json", {
            "space": "native", "pred": str(args.pred), "raw_root": str(args.raw_root),
            **results})
    except (ValueError, OSError) as error:
        log.error("%s", error)
        return 1
    print(f"{len(metrics)} cases, native space")
    print(metrics.format_table())
    print("Volumes, prediction against label:")
    print(format_agreement(results["volumes"]))
    print(f"results: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
