"""Evaluate a trained checkpoint on held-out volumes: Dice and HD95 per group.

    python test.py --checkpoint runs/Myops_R50-ViT-B_16/checkpoint_final.pth \
        --root_path data/phantom/Processed_data [--tta] [--sequences LGE,T2w | --all_subsets]

Writes per_case.csv, summary.json and dice_boxplot.png to --output_dir; with --all_subsets one
such folder per sequence subset plus subsets.csv / subsets.json (mean Dice, subset x group).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from datasets.labels import MODALITIES
from datasets.processed import ProcessedLayout
from evaluation.evaluate import (
    add_checkpoint_arguments,
    all_subsets,
    checkpoint_path,
    evaluate_subsets,
    format_subset_table,
    load_checkpoint,
    subset_label,
    write_results,
    write_subset_table,
)
from networks.sequences import parse_sequences
from networks.variants import describe
from utils import resolve_device, setup_logging

log = logging.getLogger("test")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(parser)
    parser.add_argument("--root_path", default=None,
                        help="processed data root (default: the one the model was trained on)")
    parser.add_argument("--list_dir", default=None, help="lists folder (default: <root>/lists)")
    parser.add_argument("--split", default="test_vol", help="list of volumes to evaluate")
    parser.add_argument("--output_dir", default=None,
                        help="where results go (default: <checkpoint folder>/test)")
    parser.add_argument("--batch_size", type=int, default=32,
                        help="images per forward pass (with --tta each slice counts 4 times)")
    parser.add_argument("--save_nifti", action="store_true",
                        help="write <name>_pred, _gt and the input sequences as NIfTI files "
                             "sharing one geometry (they overlay in ITK-SNAP); with "
                             "--all_subsets the label and inputs go once to reference/")
    parser.add_argument("--tta", action="store_true",
                        help="flip test-time augmentation: average probabilities over 4 flips")
    subsets = parser.add_mutually_exclusive_group()
    subsets.add_argument("--sequences", default=None,
                         help=f"comma-separated sequences given to the network, the others "
                              f"zeroed (default: all of {','.join(MODALITIES)})")
    subsets.add_argument("--all_subsets", action="store_true",
                         help="evaluate every non-empty subset of the sequences")
    parser.add_argument("--device", default="auto")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    checkpoint = checkpoint_path(args)
    output_dir = Path(args.output_dir or checkpoint.parent / "test")
    setup_logging()
    try:
        subsets = (all_subsets() if args.all_subsets
                   else [parse_sequences(MODALITIES if args.sequences is None
                                         else args.sequences)])
    except ValueError as error:
        log.error("--sequences %r: %s", args.sequences, error)
        return 1
    # One folder per subset with --all_subsets, otherwise the results go to output_dir itself.
    folders = {subset: output_dir / subset_label(subset) if args.all_subsets else output_dir
               for subset in subsets}
    try:
        device = resolve_device(args.device)
        loaded = load_checkpoint(checkpoint, device)
        root = args.root_path or loaded.payload.get("train_config", {}).get("root_path")
        if root is None:
            raise ValueError(f"{checkpoint}: holds no data root; pass --root_path")
        layout = ProcessedLayout(Path(root), list_dir=Path(args.list_dir) if args.list_dir
                                 else None)
        names = layout.names(args.split)
        results = evaluate_subsets(
            loaded.model, layout, names, loaded.img_size, device, subsets,
            batch_size=args.batch_size, tta=args.tta,
            prediction_dirs={s: f / "predictions" for s, f in folders.items()}
            if args.save_nifti else None,
            reference_dir=output_dir / "reference" if args.save_nifti and args.all_subsets
            else None)
    except (ValueError, OSError) as error:
        log.error("%s", error)
        return 1
    model = describe(loaded.model)
    settings = {"checkpoint": str(checkpoint), "root_path": str(root), "split": args.split,
                "tta": args.tta, "model": model}
    try:
        for subset, metrics in results.items():
            write_results(folders[subset], metrics, {**settings, "sequences": list(subset)},
                          title=f"{model}\n{subset_label(subset)}{' + TTA' if args.tta else ''}")
        if args.all_subsets:
            write_subset_table(output_dir, results, settings)
    except OSError as error:
        log.error("cannot write results to %s: %s", output_dir, error)
        return 1
    print(f"{model}; {len(names)} volumes of {root}{'; flip TTA' if args.tta else ''}")
    if args.all_subsets:
        print(format_subset_table(results))
    else:
        (subset,) = subsets
        print(f"sequences: {subset_label(subset)}")
        print(results[subset].format_table())
    print(f"results: {output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
