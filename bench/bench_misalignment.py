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

A run over 30 cases takes hours on a CPU. With ``--cache DIR`` every finished case's predictions
are kept in ``DIR`` (one file per case, written whole or not at all); a run started again with
the same arguments scores the kept cases from their files and predicts only the rest, and prints
the same report as an uninterrupted run. A cache made with other arguments or checkpoints is
refused, never mixed in.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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
from datasets.sequence_jitter import JITTER_MISALIGNMENT
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
from utils import atomic_path

#: MyoPS380's in-plane pixel sizes (mm) for the moved sequences.
TARGET_SPACING = {"bSSFP": 1.172, "T2w": 0.8929}


def warp_model(strength: float, nonrigid_mm: float) -> MisalignmentConfig:
    """The training jitter's model (rotation 8 deg, shift 5 mm, scale 5 %) with a field of
    ``nonrigid_mm``, every magnitude times ``strength``."""
    return dataclasses.replace(JITTER_MISALIGNMENT, nonrigid_mm=nonrigid_mm).scaled(strength)


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


def _models(paths: list[Path], device: torch.device
            ) -> list[tuple[LoadedCheckpoint, list[str] | None]]:
    """``(model, the cases it may be tested on)``: each its own test list when its training
    data's lists are at hand (a fold run: its fold's), else every case (None)."""
    models = []
    for path in paths:
        loaded = load_checkpoint(path, device)
        train = loaded.payload.get("train_config") or {}
        root = Path(train.get("root_path") or "")
        lists = Path(train["list_dir"]) if train.get("list_dir") else root / "lists"
        tested = lists / "test_vol.txt"
        models.append((loaded, tested.read_text().split() if tested.is_file() else None))
    return models


class CaseCache:
    """Finished cases' predictions under ``folder``, for a bench that resumes.

    ``fingerprint.json`` holds everything the predictions depend on (the arguments, each
    checkpoint's path, size and modification time, the conditions); a folder made under another
    fingerprint raises instead of lending its cases to a different measurement. Each case is one
    ``<model index>_<case>.npz`` (every condition's label map and its affine fit counts),
    renamed into place only once complete.
    """

    def __init__(self, folder: Path, fingerprint: dict):
        self.folder = folder
        stamp = folder / "fingerprint.json"
        if stamp.is_file():
            kept = json.loads(stamp.read_text())
            if kept != fingerprint:
                changed = sorted(key for key in fingerprint.keys() | kept.keys()
                                 if kept.get(key) != fingerprint.get(key))
                raise ValueError(f"{folder}: a cache of another measurement (differs in "
                                 f"{', '.join(changed)}); choose another --cache folder")
        else:
            with atomic_path(stamp) as tmp:
                tmp.write_text(json.dumps(fingerprint, indent=1))

    def _path(self, model: int, case_id: str) -> Path:
        return self.folder / f"{model}_{case_id}.npz"

    def load(self, model: int, case_id: str) -> dict[str, tuple[np.ndarray, dict]] | None:
        """condition -> (labels, fit counts), or None when the case is not kept."""
        path = self._path(model, case_id)
        if not path.is_file():
            return None
        with np.load(path) as stored:
            fits = json.loads(str(stored["fits"]))
            return {condition: (stored[f"labels_{i}"], fits[i])
                    for i, condition in enumerate(json.loads(str(stored["conditions"])))}

    def store(self, model: int, case_id: str,
              results: dict[str, tuple[np.ndarray, dict]]) -> None:
        arrays = {f"labels_{i}": labels for i, (labels, _) in enumerate(results.values())}
        with atomic_path(self._path(model, case_id)) as tmp, open(tmp, "wb") as handle:
            np.savez_compressed(handle, conditions=json.dumps(list(results)),
                                fits=json.dumps([fit for _, fit in results.values()]), **arrays)


def _fingerprint(args: argparse.Namespace, paths: list[Path], conditions: dict) -> dict:
    checkpoints = [[str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns]
                   for path in paths]
    return {"checkpoints": checkpoints, "raw_root": str(Path(args.raw_root).resolve()),
            "conditions": list(conditions), "strength": args.strength,
            "nonrigid_mm": args.nonrigid_mm, "per": args.per, "seed": args.seed,
            "voxelmorph": args.voxelmorph, "cases": args.cases}


def _fit_counts(record: dict) -> dict:
    """How many slices the affine step fitted and how many of those fell back to the identity."""
    fitted = [fit for sequence_fits in record["registration"].get("affine", {}).values()
              for fit in sequence_fits]
    return {"slices": len(fitted), "identity": sum(fit["model"] == "identity" for fit in fitted)}


def run(args: argparse.Namespace) -> dict:
    for chosen, known, what in ((args.metrics, AFFINE_METRICS, "--metrics"),
                                (args.pooling, AFFINE_POOLINGS, "--pooling")):
        unknown = sorted(set(chosen) - set(known))
        if unknown:
            raise ValueError(f"{what}: unknown {unknown}; known: {list(known)}")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    paths = checkpoint_paths(args)
    models = _models(paths, device)
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
    cache = (CaseCache(Path(args.cache), _fingerprint(args, paths, conditions))
             if args.cache else None)
    scores = {condition: MetricAccumulator() for condition in conditions}
    # registered conditions: slices fitted and slices whose fit fell back to the identity
    fits = {condition: {"slices": 0, "identity": 0} for condition, spec in conditions.items()
            if spec[0]}
    rng = np.random.default_rng(args.seed)
    cases = {files.case_id: files for files in discover_cases(args.raw_root)}
    done = 0
    for index, (loaded, allowed) in enumerate(models):
        preprocess, _ = preprocess_config_for(loaded.payload)
        for case_id in sorted(allowed if allowed is not None else cases):
            if args.cases and done >= args.cases:
                break
            case = load_case(cases[case_id])
            truth = case.label
            # Drawn for kept cases too, so that the later cases see the same draws.
            records = {name: draw_records(truth, case.images[name].num_slices, args.per, warp,
                                          rng) for name in TARGET_SPACING}
            results = cache.load(index, case_id) if cache else None
            if results is None:
                results = {}
                # bSSFP and T2w as every condition sees them: resampled only, or also moved
                inputs = {aligned: {name: moved_volume(case.images[name], spacing,
                                                       None if aligned else records[name])
                                    for name, spacing in TARGET_SPACING.items()}
                          for aligned in (True, False)}
                for condition, (affine, nonrigid, rounds, other) in conditions.items():
                    moved = inputs[condition == "aligned"]
                    geometry = dataclasses.replace(preprocess, affine_registration=affine,
                                                   nonrigid_registration=nonrigid, **other)
                    config = PredictConfig(preprocess=geometry, register=affine,
                                           register_rounds=rounds)
                    patient = PatientImages(case_id, {"LGE": case.images["LGE"]} | moved)
                    prediction = predict_patient(loaded.model, loaded.img_size, patient, config,
                                                 device, Registration(voxelmorph=voxelmorph))
                    results[condition] = (prediction.labels, _fit_counts(prediction.record))
                if cache:
                    cache.store(index, case_id, results)
            for condition, (labels, counts) in results.items():
                scores[condition].update(case_id, labels, truth.array, truth.spacing)
                if condition in fits:
                    for key in fits[condition]:
                        fits[condition][key] += counts[key]
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
    parser.add_argument("--cache", default=None,
                        help="keep each finished case's predictions here; a run started again "
                             "with the same arguments predicts only the cases not kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return print_report(lambda: run(args))


if __name__ == "__main__":
    raise SystemExit(main())
