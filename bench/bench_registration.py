"""Residual misalignment in the myocardium before and after each registration step (JSON).

Two sources of known misalignment:

* ``phantom``: phantom cases, whose recorded sampling maps ``W`` say where each bSSFP/T2w pixel's
  anatomy sits in the LGE frame;
* ``real``: real MyoPS 2020 cases (pre-aligned) whose bSSFP and T2 slices we warp by a known
  similarity + B-spline map first (same model as the phantom).

For every myocardium pixel ``q`` of the output (LGE label) and every stage (none, affine,
affine+non-rigid), the pipeline's sampling position ``p`` in the moving slice is mapped through
``W``; the residual is ``|W(p) - q|`` in mm, in-plane. Per stage also: ``recovered_fraction``
(how much of the known misalignment it undid) and ``centre_error_mm`` (how far it leaves the heart
as a whole); per sequence ``floor_mm``, about the least residual a per-slice translation or
affine map could leave (see :class:`preprocessing.alignment_error.MyocardialErrors`). Also
reports seconds per case.

On real cases the reference is the organisers' pre-alignment, which the images themselves
support only to about 0.4-1 mm (``bench_reference_agreement``). ``--recovery`` therefore also
runs the unwarped cases and reports ``unwarped_move_mm`` (how far registration moves slices that
already agree with the reference) and ``recovery_mm``: the error vectors less the unwarped run's,
i.e. how well the known warp itself is undone, whatever the registration's own disagreement
with the reference (zero for a registration that commutes with any warp).

    python -m bench.bench_registration --source phantom --cases 10
    python -m bench.bench_registration --source real --cases 10 --recovery
    python -m bench.bench_registration --source real --cases 10 --same_contrast
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from bench.measure import print_report
from datasets.misalignment import (
    MisalignmentConfig,
    apply_slice_misalignment,
    sample_slice_misalignment,
    warp_slice,
)
from datasets.phantom import misalignment_map, write_phantom_dataset
from datasets.raw import discover_cases, load_case
from preprocessing.alignment_error import MyocardialErrors, myocardial_errors, plane_mm
from preprocessing.pipeline import AFFINE_METRICS, PreprocessConfig, align_case, finish_case
from preprocessing.runner import registration_pairs
from preprocessing.segmenter import CheckpointSegmenter
from preprocessing.voxelmorph import train_voxelmorph
from preprocessing.voxelmorph_net import VoxelMorph2D, VoxelMorphConfig

REPO = Path(__file__).resolve().parents[1]


def _phantom_source(root: Path, cases: int, seed: int):
    write_phantom_dataset(root, cases, seed=seed)
    truths = {p.stem: json.loads(p.read_text()) for p in (root / "phantom_truth").glob("*.json")}

    def factory(case_id: str, case):
        def truth_map(name, index, xy):
            return misalignment_map(truths[case_id]["sequences"][name], index, xy)

        def frame(name, world):
            return world[:, :2]

        return truth_map, frame

    return root, factory


def _real_source(source: Path, root: Path, cases: int, seed: int,
                 misalignment: MisalignmentConfig, case_ids: Sequence[str] | None = None,
                 same_contrast: bool = False):
    """Copy real cases with bSSFP and T2 slices warped by known maps; returns the truth.

    ``case_ids`` picks the cases (e.g. ones a segmenter never trained on), else the first
    ``cases``. With ``same_contrast`` the warped images are copies of the LGE (MyoPS 2020 keeps
    all sequences on one grid): a control in which registration matches the fixed image's own
    contrast, so what is left is the pipeline's, not the cross-contrast metric's.
    """
    rng = np.random.default_rng(seed)
    records: dict[str, dict[str, list]] = {}
    available = discover_cases(source)
    if case_ids:
        unknown = sorted(set(case_ids) - {files.case_id for files in available})
        if unknown:
            raise ValueError(f"{source}: no case(s) {unknown}")
        chosen = [files for files in available if files.case_id in case_ids]
    else:
        chosen = available[:cases]
    for files in chosen:
        case_dir = root / files.case_id
        case_dir.mkdir(parents=True)
        label_image = nib.load(str(files.label))
        label = np.asanyarray(label_image.dataobj)
        sx, sy = (float(v) for v in label_image.header.get_zooms()[:2])
        records[files.case_id] = {}
        for name, path in files.images.items():
            target = case_dir / path.name
            if name == "LGE":
                shutil.copy(path, target)
                continue
            image = source_image = nib.load(str(path))
            if same_contrast:
                source_image = nib.load(str(files.images["LGE"]))
                if (source_image.shape != image.shape
                        or not np.allclose(source_image.affine, image.affine, atol=1e-3)):
                    raise ValueError(f"{path}: not on the LGE's grid, which --same_contrast "
                                     f"needs")
            data = np.asanyarray(source_image.dataobj).astype(np.float32)
            warped = np.empty_like(data)
            slice_records = []
            for k in range(data.shape[2]):
                cols, rows = np.nonzero(np.isin(label[:, :, k], (200, 1220, 2221)))
                centre = ((cols.mean() if cols.size else data.shape[0] / 2) * sx,
                          (rows.mean() if rows.size else data.shape[1] / 2) * sy)
                xs, ys = np.arange(data.shape[0]) * sx, np.arange(data.shape[1]) * sy
                record, _ = sample_slice_misalignment(rng, centre, xs, ys, misalignment)
                # warp_slice works on [rows, cols] = [y, x]; NIfTI slices are [x, y].
                warped[:, :, k] = warp_slice(data[:, :, k].T, (sx, sy), record,
                                             is_label=False).T
                slice_records.append(record)
            records[files.case_id][name] = slice_records
            nib.save(nib.Nifti1Image(warped, image.affine, image.header), str(target))
        shutil.copy(files.label, case_dir / files.label.name)

    def factory(case_id: str, case):
        def truth_map(name, index, xy):
            return apply_slice_misalignment(records[case_id][name][index], xy)

        def frame(name, world):
            return plane_mm(case.images[name], world)

        return truth_map, frame

    return root, factory


def _scaled_warp(scale: float) -> MisalignmentConfig:
    """The default known misalignment with every magnitude times ``scale`` (0: none)."""
    base = MisalignmentConfig()
    return replace(base, max_rotation_deg=base.max_rotation_deg * scale,
                   max_translation_mm=base.max_translation_mm * scale,
                   max_scale=base.max_scale * scale, nonrigid_mm=base.nonrigid_mm * scale)


@dataclass
class _Run:
    """One pass of the pipeline over a source: errors per moving sequence and timings."""

    errors: dict[str, MyocardialErrors]
    model: VoxelMorph2D
    cases: int
    pairs: int
    align_seconds: list[float]
    finish_seconds: list[float]
    train_seconds: float


def _measure(root: Path, factory, config: PreprocessConfig, segmenter,
             voxelmorph: int | VoxelMorph2D) -> _Run:
    """Align every case of ``root``, train the non-rigid network for ``voxelmorph`` iterations
    (or reuse the given network), finish the cases and measure their myocardial errors."""
    loaded, aligned, align_seconds = {}, {}, []
    for files in discover_cases(root):
        case = load_case(files)
        start = time.perf_counter()
        aligned[files.case_id] = align_case(case, config, segmenter)
        align_seconds.append(time.perf_counter() - start)
        loaded[files.case_id] = case
    start = time.perf_counter()
    pairs = registration_pairs(aligned.values(), config)
    model = voxelmorph if isinstance(voxelmorph, VoxelMorph2D) else train_voxelmorph(
        pairs, replace(VoxelMorphConfig(), iterations=voxelmorph), torch.device("cpu"),
        progress=False)
    train_seconds = time.perf_counter() - start
    errors: dict[str, list[MyocardialErrors]] = {}
    finish_seconds = []
    for case_id, case_aligned in aligned.items():
        start = time.perf_counter()
        processed = finish_case(loaded[case_id], case_aligned, config, model,
                                torch.device("cpu"))
        finish_seconds.append(time.perf_counter() - start)
        truth_map, frame = factory(case_id, loaded[case_id])
        for name, case_errors in myocardial_errors(case_aligned, processed.fields,
                                                   truth_map, frame).items():
            errors.setdefault(name, []).append(case_errors)
    return _Run({name: MyocardialErrors.concatenate(parts) for name, parts in errors.items()},
                model, len(aligned), len(pairs), align_seconds, finish_seconds, train_seconds)


def _summary(errors: MyocardialErrors) -> dict[str, dict]:
    """Residual statistics per stage, what each stage undid, and the model floors."""
    summary: dict[str, dict] = {}
    warped = bool(np.any(errors.stages["none"]))
    for stage in errors.stages:
        residual = errors.residuals(stage)
        summary[stage] = {"mean": float(residual.mean()), "median": float(np.median(residual)),
                          "p95": float(np.percentile(residual, 95)), "pixels": len(residual),
                          "centre_error_mm": errors.centre_error(stage),
                          "about_centre_mm": errors.about_centre_error(stage)}
        if stage != "none" and warped:
            summary[stage]["recovered_fraction"] = errors.recovered_fraction(stage)
    summary["floor_mm"] = errors.floors()
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=("phantom", "real"), default="phantom")
    parser.add_argument("--real_root", type=Path, default=REPO.parent / "shared" / "data"
                        / "myops2020")
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--voxelmorph_iterations", type=int,
                        default=VoxelMorphConfig().iterations)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--affine_metric", choices=AFFINE_METRICS,
                        default=PreprocessConfig().affine_metric)
    parser.add_argument("--segmenter", type=Path, default=None,
                        help="checkpoint for --affine_metric segmentation")
    parser.add_argument("--case_ids", default=None,
                        help="comma-separated real cases (default: the first --cases)")
    parser.add_argument("--recovery", action="store_true",
                        help="also register the real cases unwarped and report the residual "
                             "against that result (how well the known warp itself is undone)")
    parser.add_argument("--same_contrast", action="store_true",
                        help="warp copies of the LGE in place of bSSFP and T2 (a control: "
                             "registration then matches the fixed image's own contrast)")
    parser.add_argument("--warp_scale", type=float, default=1.0,
                        help="scale of the known warp applied to real cases (0: none, which "
                             "shows how far registration moves already aligned slices)")
    args = parser.parse_args(argv)
    if args.cases < 1 or args.threads < 1:
        print("error: --cases and --threads must be >= 1", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    config = PreprocessConfig(affine_metric=args.affine_metric)
    if (args.segmenter is not None) != (args.affine_metric == "segmentation"):
        parser.error("--segmenter and --affine_metric segmentation go together")
    if (args.case_ids or args.recovery or args.same_contrast) and args.source != "real":
        parser.error("--case_ids, --recovery and --same_contrast need real cases "
                     "(--source real)")
    return print_report(lambda: _report(args, config))


def _report(args: argparse.Namespace, config: PreprocessConfig) -> dict:
    """Run the benchmark the parsed ``args`` describe and return its JSON report."""
    segmenter = None
    if args.affine_metric == "segmentation":
        segmenter = CheckpointSegmenter(args.segmenter, torch.device("cpu"))
    case_ids = [case.strip() for case in args.case_ids.split(",")] if args.case_ids else None
    with tempfile.TemporaryDirectory() as tmp:
        if args.source == "phantom":
            source = _phantom_source(Path(tmp) / "raw", args.cases, args.seed)
        else:
            source = _real_source(args.real_root, Path(tmp) / "raw", args.cases, args.seed,
                                  _scaled_warp(args.warp_scale), case_ids, args.same_contrast)
        run = _measure(*source, config, segmenter, args.voxelmorph_iterations)
        if args.recovery:
            # The same cases without the warp, through the same trained non-rigid network.
            unwarped = _measure(*_real_source(args.real_root, Path(tmp) / "unwarped", args.cases,
                                              args.seed, _scaled_warp(0.0), case_ids,
                                              args.same_contrast),
                                config, segmenter, run.model)
    report = {
        "source": args.source, "cases": run.cases, "pairs": run.pairs,
        "residual_mm": {name: _summary(errors) for name, errors in run.errors.items()},
        "seconds_per_case": {"align (steps 1-3)": float(np.mean(run.align_seconds)),
                             "non-rigid + final resampling": float(np.mean(run.finish_seconds))},
        "voxelmorph_training_seconds": run.train_seconds,
        "voxelmorph_iterations": args.voxelmorph_iterations,
        "threads": args.threads,
        "affine_metric": args.affine_metric,
        "segmenter": None if segmenter is None else segmenter.describe(),
        "warp_scale": args.warp_scale if args.source == "real" else None,
        "same_contrast": args.same_contrast,
    }
    if args.recovery:
        report["unwarped_move_mm"] = {name: _summary(errors)
                                      for name, errors in unwarped.errors.items()}
        report["recovery_mm"] = {name: _summary(errors.relative_to(unwarped.errors[name]))
                                 for name, errors in run.errors.items()}
    return report


if __name__ == "__main__":
    sys.exit(main())
