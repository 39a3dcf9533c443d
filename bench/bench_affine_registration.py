"""Accuracy and speed of the mask-guided affine step on real MyoPS 2020 slices with known motion.

Run from the repository root: ``python -m bench.bench_affine_registration --cases 6``.
Every matched slice's bSSFP and T2w are moved by a random breath-hold-like affine (rotation,
shift, scale within the stated ranges), registered back onto LGE, and the myocardial residual
``|estimate(q) - truth(q)|`` is reported in mm before and after, with seconds per slice. Prints
one JSON document.

The residual takes the data set's own pre-alignment as truth. ``--self-consistency`` also fits
each unmoved pair and reports the residual against that fit composed with the known motion, which
separates how well the optimiser undoes the motion from where the metric's optimum lies.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from datasets.raw import discover_cases, load_case
from preprocessing.affine_registration import (
    MODELS,
    AffineRegistrationConfig,
    myocardium_metric_mask,
    register_affine,
)
from preprocessing.pipeline import PreprocessConfig, preprocess_case
from preprocessing.transforms import Affine2D, warp

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "myops2020"
MOVING = ("bSSFP", "T2w")


def random_motion(rng: np.random.Generator, centre: np.ndarray, max_rotation_deg: float,
                  max_shift_mm: float, max_scale: float, spacing_mm: float) -> Affine2D:
    """Uniform rotation and scale about the heart, shift of uniform length and direction."""
    length = rng.uniform(0, max_shift_mm) / spacing_mm
    direction = rng.uniform(0, 2 * np.pi)
    return Affine2D.from_parameters(
        rng.uniform(-max_rotation_deg, max_rotation_deg),
        rng.uniform(1 - max_scale, 1 + max_scale),
        (length * np.sin(direction), length * np.cos(direction)), tuple(centre))


def mean_distance_mm(first: Affine2D, second: Affine2D, points: np.ndarray,
                     spacing_mm: float) -> float:
    return float(np.linalg.norm(first.apply(points) - second.apply(points), axis=1).mean()
                 * spacing_mm)


def summary(values: Sequence[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    return {"mean": round(float(array.mean()), 3), "median": round(float(np.median(array)), 3),
            "p95": round(float(np.percentile(array, 95)), 3),
            "max": round(float(array.max()), 3), "n": int(array.size)}


def bench_slice(fixed: np.ndarray, moving: np.ndarray, label: np.ndarray, truth: Affine2D,
                config: AffineRegistrationConfig, self_consistency: bool) -> dict[str, Any]:
    """Register one moved slice; distances over the myocardium in mm."""
    spacing = config.pixel_spacing_mm
    points = np.argwhere(label > 0).astype(np.float64)
    mask = myocardium_metric_mask(label, config.mask_margin_mm, spacing)
    moved = warp(moving, truth.inverse().field(moving.shape), is_label=False)
    result = register_affine(fixed, moved, mask, config)
    row = {
        "before_mm": mean_distance_mm(Affine2D.identity(), truth, points, spacing),
        "after_mm": mean_distance_mm(result.transform, truth, points, spacing),
        "seconds": result.seconds,
        "model": result.model,
    }
    if self_consistency:
        unmoved = register_affine(fixed, moving, mask, config)
        row["unmoved_fit_shift_mm"] = mean_distance_mm(unmoved.transform, Affine2D.identity(),
                                                       points, spacing)
        row["consistency_mm"] = mean_distance_mm(result.transform,
                                                 unmoved.transform.then(truth), points, spacing)
    return row


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MyoPS 2020 case folder")
    parser.add_argument("--cases", type=int, default=None, help="first N cases (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", choices=MODELS, default="affine")
    parser.add_argument("--margin-mm", type=float, default=AffineRegistrationConfig.mask_margin_mm)
    parser.add_argument("--max-rotation-deg", type=float, default=5.0)
    parser.add_argument("--max-shift-mm", type=float, default=4.0)
    parser.add_argument("--max-scale", type=float, default=0.04, help="scale in 1 +- this")
    parser.add_argument("--self-consistency", action="store_true",
                        help="also fit each unmoved pair (doubles the run time)")
    args = parser.parse_args(argv)
    if args.cases is not None and args.cases < 1:
        parser.error("--cases must be >= 1")
    if not args.data.is_dir():
        parser.error(f"no data at {args.data}")

    config = AffineRegistrationConfig(model=args.model, mask_margin_mm=args.margin_mm)
    rng = np.random.default_rng(args.seed)
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in MOVING}
    wall = time.perf_counter()
    for files in discover_cases(args.data)[: args.cases]:
        processed = preprocess_case(load_case(files), PreprocessConfig(roi_size=224))
        for index, label in enumerate(processed.label):
            if not (label > 0).any():
                continue
            centre = np.argwhere(label > 0).mean(axis=0)
            for name in MOVING:
                truth = random_motion(rng, centre, args.max_rotation_deg, args.max_shift_mm,
                                      args.max_scale, config.pixel_spacing_mm)
                row = bench_slice(processed.images["LGE"][index], processed.images[name][index],
                                  label, truth, config, args.self_consistency)
                rows[name].append({"case": files.case_id, "slice": index} | row)

    report: dict[str, Any] = {
        "data": str(args.data),
        "config": config.to_dict(),
        "motion": {"max_rotation_deg": args.max_rotation_deg, "max_shift_mm": args.max_shift_mm,
                   "max_scale": args.max_scale, "seed": args.seed},
        "machine": platform.processor() or platform.machine(),
        "simpleitk": sitk.Version.VersionString(),
        "slices": len(rows[MOVING[0]]),
        "wall_seconds": round(time.perf_counter() - wall, 1),
    }
    pair_seconds = [sum(rows[name][k]["seconds"] for name in MOVING)
                    for k in range(len(rows[MOVING[0]]))]
    report["seconds_per_slice_pair"] = summary(pair_seconds) if pair_seconds else None
    for name, entries in rows.items():
        if not entries:
            continue
        stats: dict[str, Any] = {key: summary([e[key] for e in entries])
                                 for key in ("before_mm", "after_mm", "seconds")}
        stats["fraction_after_below_1mm"] = round(
            float(np.mean([e["after_mm"] < 1.0 for e in entries])), 3)
        stats["models"] = {m: sum(e["model"] == m for e in entries) for m in (*MODELS, "identity")}
        if args.self_consistency:
            for key in ("unmoved_fit_shift_mm", "consistency_mm"):
                stats[key] = summary([e[key] for e in entries])
        report[name] = stats
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
