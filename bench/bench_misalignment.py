"""What misaligned bSSFP/T2w cost a trained network, label-free, in native space (JSON).

    python -m bench.bench_misalignment --run_dir runs/myops2020_cv/immseg \
        [--raw_root ../shared/data/myops2020] [--strength 1] [--per sequence|slice] \
        [--voxelmorph data/.../voxelmorph.pth] [--cases 6]

Each held-out case (out of fold for a cross-validation folder) is predicted as predict.py
predicts a new patient, under several conditions, and scored against its raw label on the LGE's
native grid:

* ``aligned``: bSSFP resampled to 1.172 mm and T2w to 0.8929 mm in-plane (MyoPS380's pixel
  sizes), nothing moved: the resampling alone;
* ``misaligned``: the same resampling of bSSFP and T2w after a known in-plane misalignment
  (rotation up to 8 degrees, shift up to 5 mm, scale within 5 %, times ``--strength``; optional
  smooth field), one draw per sequence (``--per sequence``, the whole volume moves) or per slice;
  LGE and the label stay untouched;
* ``misaligned + affine``: the same inputs with the affine registration of preprocessing at
  prediction time (``--register on``: the training data's metric, guided by the first-pass
  myocardium);
* ``misaligned + affine, M metric`` with ``--metrics M[,N]``: another affine metric than the
  training data's (``ngf``, ``mattes``, ``consensus``);
* ``misaligned + affine, P pooling`` with ``--pooling P[,Q]``: the slices' fits pooled over the
  stack (``stack`` or ``shrink``, :mod:`preprocessing.affine_pooling`);
* ``misaligned + affine, N rounds`` with ``--rounds N``: register, predict, register again with
  the new myocardium, N times (``predict.py --register_rounds``);
* ``misaligned + affine + non-rigid`` with ``--voxelmorph``.

The misalignment centre (the heart) comes from the label: it shapes the synthetic warp, never
the network's input. Mean Dice (%) per group and condition, and each condition's loss against
``aligned``.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from bench.measure import print_report
from commands.options import checkpoint_paths
from datasets.labels import EVAL_GROUPS, MODALITIES
from datasets.misalignment import (
    MisalignmentConfig,
    apply_slice_misalignment,
    sample_slice_misalignment,
)
from datasets.raw import Volume, discover_cases, load_case
from evaluation.metrics import MetricAccumulator
from networks.checkpoint import LoadedCheckpoint, load_checkpoint
from prediction.inputs import PatientImages
from prediction.pipeline import (
    PredictConfig,
    Registration,
    predict_patient,
    preprocess_config_for,
)
from preprocessing.affine_pooling import AFFINE_POOLINGS
from preprocessing.config import AFFINE_METRICS
from preprocessing.resample import antialias_sigma

#: MyoPS380's in-plane pixel sizes (mm) for the moved sequences.
TARGET_SPACING = {"bSSFP": 1.172, "T2w": 0.8929}


def warp_model(strength: float, nonrigid_mm: float) -> MisalignmentConfig:
    return MisalignmentConfig(max_rotation_deg=8.0 * strength,
                              max_translation_mm=5.0 * strength, max_scale=0.05 * strength,
                              nonrigid_mm=nonrigid_mm * strength)


def moved_volume(volume: Volume, spacing_mm: float, records: list[dict] | None) -> Volume:
    """``volume`` resampled to square ``spacing_mm`` pixels over the same field of view, every
    slice ``k`` moved by ``records[k]`` (a :mod:`datasets.misalignment` record in the slice's
    own mm frame; None: not moved). One interpolation (cubic), anti-aliased when coarser."""
    depth, height, width = volume.array.shape
    _, sy, sx = volume.spacing
    rows, cols = round(height * sy / spacing_mm), round(width * sx / spacing_mm)
    grid_r, grid_c = np.mgrid[:rows, :cols].astype(np.float64) * spacing_mm
    points = np.stack([grid_c.ravel(), grid_r.ravel()], axis=1)  # (x, y) mm
    out = np.empty((depth, rows, cols), np.float32)
    for k in range(depth):
        source = points if records is None else apply_slice_misalignment(records[k], points)
        image = volume.array[k].astype(np.float64)
        sigma = [antialias_sigma(spacing_mm / sy), antialias_sigma(spacing_mm / sx)]
        if any(sigma):
            image = ndimage.gaussian_filter(image, sigma)
        coords = np.stack([source[:, 1] / sy, source[:, 0] / sx])
        out[k] = ndimage.map_coordinates(image, coords, order=3, mode="constant").reshape(
            rows, cols)
    affine = volume.affine.copy()
    affine[:3, 0] *= spacing_mm / sx
    affine[:3, 1] *= spacing_mm / sy
    return Volume(np.clip(out, 0, None), affine, volume.source)


def draw_records(label: Volume, depth: int, per: str, config: MisalignmentConfig,
                 rng: np.random.Generator) -> list[dict]:
    """One misalignment per slice, about the labelled heart (the same for every slice with
    ``per="sequence"``)."""
    _, sy, sx = label.spacing
    heart = np.argwhere(label.array > 0)
    xs, ys = np.arange(label.array.shape[2]) * sx, np.arange(label.array.shape[1]) * sy
    if per == "sequence":
        centre = (heart[:, 2].mean() * sx, heart[:, 1].mean() * sy)
        record, _ = sample_slice_misalignment(rng, centre, xs, ys, config)
        return [record] * depth
    records = []
    for k in range(depth):
        on_slice = heart[heart[:, 0] == k] if (heart[:, 0] == k).any() else heart
        centre = (on_slice[:, 2].mean() * sx, on_slice[:, 1].mean() * sy)
        records.append(sample_slice_misalignment(rng, centre, xs, ys, config)[0])
    return records


def _models(args: argparse.Namespace, device: torch.device
            ) -> list[tuple[LoadedCheckpoint, list[str] | None]]:
    """``(model, the cases it may be tested on)``: each its own test list when its training
    data's lists are at hand (a fold run: its fold's), else every case (None)."""
    models = []
    for path in checkpoint_paths(args):
        loaded = load_checkpoint(path, device)
        train = loaded.payload.get("train_config") or {}
        root = Path(train.get("root_path") or "")
        lists = Path(train["list_dir"]) if train.get("list_dir") else root / "lists"
        tested = lists / "test_vol.txt"
        models.append((loaded, tested.read_text().split() if tested.is_file() else None))
    return models


def run(args: argparse.Namespace) -> dict:
    for chosen, known, what in ((args.metrics, AFFINE_METRICS, "--metrics"),
                                (args.pooling, AFFINE_POOLINGS, "--pooling")):
        unknown = sorted(set(chosen) - set(known))
        if unknown:
            raise ValueError(f"{what}: unknown {unknown}; known: {list(known)}")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    models = _models(args, device)
    warp = warp_model(args.strength, args.nonrigid_mm)
    # condition -> (affine, non-rigid, register-then-predict rounds, other preprocessing)
    conditions = {"aligned": (False, False, 1, {}), "misaligned": (False, False, 1, {}),
                  "misaligned + affine": (True, False, 1, {})}
    for metric in args.metrics:
        conditions[f"misaligned + affine, {metric} metric"] = (True, False, 1,
                                                               {"affine_metric": metric})
    for pooling in args.pooling:
        conditions[f"misaligned + affine, {pooling} pooling"] = (True, False, 1,
                                                                 {"affine_pooling": pooling})
    if args.rounds > 1:
        conditions[f"misaligned + affine, {args.rounds} rounds"] = (True, False, args.rounds,
                                                                     {})
    voxelmorph = None
    if args.voxelmorph:
        from preprocessing.voxelmorph import load_voxelmorph

        voxelmorph = load_voxelmorph(args.voxelmorph, device)
        conditions["misaligned + affine + non-rigid"] = (True, True, 1, {})
    scores = {condition: MetricAccumulator() for condition in conditions}
    # registered conditions: slices fitted and slices whose fit fell back to the identity
    fits = {condition: {"slices": 0, "identity": 0} for condition, spec in conditions.items()
            if spec[0]}
    rng = np.random.default_rng(args.seed)
    cases = {files.case_id: files for files in discover_cases(args.raw_root)}
    done = 0
    for loaded, allowed in models:
        preprocess, _ = preprocess_config_for(loaded.payload)
        for case_id in sorted(allowed if allowed is not None else cases):
            if args.cases and done >= args.cases:
                break
            case = load_case(cases[case_id])
            truth = case.label
            records = {name: draw_records(truth, case.images[name].num_slices, args.per, warp,
                                          rng) for name in TARGET_SPACING}
            for condition, (affine, nonrigid, rounds, other) in conditions.items():
                moved = {name: moved_volume(case.images[name], spacing,
                                            None if condition == "aligned" else records[name])
                         for name, spacing in TARGET_SPACING.items()}
                geometry = dataclasses.replace(preprocess, affine_registration=affine,
                                               nonrigid_registration=nonrigid, **other)
                config = PredictConfig(preprocess=geometry, register=affine,
                                       register_rounds=rounds)
                patient = PatientImages(case_id, {"LGE": case.images["LGE"]} | moved)
                prediction = predict_patient(loaded.model, loaded.img_size, patient, config,
                                             device, Registration(voxelmorph=voxelmorph))
                scores[condition].update(case_id, prediction.labels, truth.array,
                                         truth.spacing)
                for sequence_fits in prediction.record["registration"].get("affine",
                                                                            {}).values():
                    fits[condition]["slices"] += len(sequence_fits)
                    fits[condition]["identity"] += sum(fit["model"] == "identity"
                                                       for fit in sequence_fits)
            done += 1
    table = {condition: {group: 100 * values["dice"]["mean"]
                         for group, values in accumulator.summary().items()}
             for condition, accumulator in scores.items()}
    return {"cases": done, "per": args.per, "strength": args.strength,
            "warp": dataclasses.asdict(warp), "target_spacing_mm": TARGET_SPACING,
            "dice_percent": table,
            "loss_vs_aligned": {condition: {group: table["aligned"][group] - value
                                            for group, value in row.items()}
                                for condition, row in table.items() if condition != "aligned"},
            "affine_fits": fits,
            "groups": list(EVAL_GROUPS), "sequences": list(MODALITIES),
            "per_case": {condition: accumulator.per_case()
                         for condition, accumulator in scores.items()}}


def _names(text: str) -> list[str]:
    """A comma-separated flag value as a list (empty for an empty value)."""
    return text.split(",") if text else []


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--checkpoint", nargs=1)
    where.add_argument("--run_dir", help="a run, or a cross-validation folder (out of fold)")
    parser.add_argument("--raw_root", default="../shared/data/myops2020")
    parser.add_argument("--strength", type=float, default=1.0)
    parser.add_argument("--nonrigid_mm", type=float, default=0.0,
                        help="amplitude of the smooth field (times --strength)")
    parser.add_argument("--per", choices=("sequence", "slice"), default="sequence")
    parser.add_argument("--voxelmorph", default=None,
                        help="non-rigid network for the affine + non-rigid condition")
    parser.add_argument("--rounds", type=int, default=1,
                        help="also the affine condition with this many register-then-predict "
                             "rounds (predict.py --register_rounds)")
    parser.add_argument("--metrics", type=_names,
                        default=[], help="also the affine condition with these metrics, e.g. "
                                         "ngf,mattes (preprocess_data.py --affine_metric)")
    parser.add_argument("--pooling", type=_names,
                        default=[], help="also the affine condition with these poolings of the "
                                         "slices' fits, e.g. stack,shrink "
                                         "(preprocessing.affine_pooling)")
    parser.add_argument("--cases", type=int, default=0, help="at most this many (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return print_report(lambda: run(args))


if __name__ == "__main__":
    raise SystemExit(main())
