"""How precisely the pre-aligned real data define "aligned", the reference of the known-warp test.

``bench_registration --source real`` scores registration against the alignment MyoPS 2020 came
with. Here three independent metrics (NGF to LGE, NGF to the label's myocardium, Mattes MI to
LGE; see :mod:`preprocessing.reference_agreement`) fit every *unwarped* bSSFP and T2w slice
onto that alignment. Their agreement splits the offsets they find (of the heart centre, and of
every myocardium pixel as the known-warp test counts them) into the part they share
(``pair_common`` per pair of metrics, ``common`` for all: the reference's own rms offset from
what the images show, as far as the metrics follow it) and each metric's own noise
(``own_rms``), with bootstrap 5-95 % intervals over slices. Prints JSON.

    python -m bench.bench_reference_agreement                 # all real cases
    python -m bench.bench_reference_agreement --cases 10
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.measure import print_report
from datasets.raw import discover_cases, load_case
from preprocessing.affine_estimators import independent_estimators, reference_transforms
from preprocessing.pipeline import PreprocessConfig, align_case
from preprocessing.reference_agreement import heart_offsets, myocardial_offsets, split_agreement

REPO = Path(__file__).resolve().parents[1]


def agreement(real_root: Path, cases: int | None, bootstrap: int) -> dict:
    """Every estimator's fits on the unwarped cases, split per moving sequence: heart-centre
    offsets, and the offsets of every myocardium pixel (what the known-warp test averages)."""
    config = PreprocessConfig(affine_registration=False)
    spacing = config.pixel_spacing_mm
    estimators = independent_estimators(config.affine)
    centres: dict[str, dict[str, list[np.ndarray]]] = {}
    fields: dict[str, dict[str, list[np.ndarray]]] = {}
    slices: dict[str, list[np.ndarray]] = {}
    start = time.perf_counter()
    chosen = discover_cases(real_root)[:cases]
    reference, done = None, 0
    for files in chosen:
        aligned = align_case(load_case(files), config)
        reference = aligned.fixed
        masks = aligned.metric_mask(config.affine.mask_margin_mm, spacing)
        myocardium = aligned.label > 0
        fixed = aligned.unregistered[aligned.fixed].astype(np.float32)
        for name in aligned.moving:
            moving = aligned.unregistered[name].astype(np.float32)
            found = reference_transforms(fixed, myocardium, moving, masks, estimators)
            for estimator, transforms in found.items():
                centres.setdefault(name, {}).setdefault(estimator, []).append(
                    heart_offsets(transforms, myocardium, spacing))
                points, index = myocardial_offsets(transforms, myocardium, spacing)
                fields.setdefault(name, {}).setdefault(estimator, []).append(points)
            # Number the slices apart across cases: the bootstrap redraws whole slices.
            slices.setdefault(name, []).append(index + done)
        done += len(myocardium)

    def joined(per: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
        return {estimator: np.concatenate(parts) for estimator, parts in per.items()}

    return {
        "cases": len(chosen),
        "reference": reference,
        "heart_centre": {name: split_agreement(joined(per), bootstrap=bootstrap).to_dict()
                         for name, per in centres.items()},
        "myocardium": {name: split_agreement(joined(per), groups=np.concatenate(slices[name]),
                                             bootstrap=bootstrap).to_dict()
                       for name, per in fields.items()},
        "unit": "mm: rms of in-plane offsets (over slices; over myocardium pixels)",
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real_root", type=Path,
                        default=REPO.parent / "shared" / "data" / "myops2020")
    parser.add_argument("--cases", type=int, default=None, help="first N cases (default: all)")
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if (args.cases is not None and args.cases < 1) or args.bootstrap < 0 or args.threads < 1:
        print("error: --cases and --threads must be >= 1, --bootstrap >= 0", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    return print_report(lambda: agreement(args.real_root, args.cases, args.bootstrap))


if __name__ == "__main__":
    sys.exit(main())
