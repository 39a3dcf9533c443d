"""Evaluate a trained checkpoint on held-out volumes: Dice and HD95 per group.

    python test.py --checkpoint runs/Myops_R50-ViT-B_16/checkpoint_final.pth \
        --root_path data/phantom/Processed_data
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from datasets.processed import ProcessedLayout
from evaluation.evaluate import evaluate, load_checkpoint
from networks.variants import describe
from trainer import CHECKPOINT_FINAL
from utils import resolve_device, setup_logging

log = logging.getLogger("test")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--checkpoint", help="checkpoint file written by train.py")
    where.add_argument("--run_dir", help=f"run folder of train.py (uses {CHECKPOINT_FINAL})")
    parser.add_argument("--root_path", default=None,
                        help="processed data root (default: the one the model was trained on)")
    parser.add_argument("--list_dir", default=None, help="lists folder (default: <root>/lists)")
    parser.add_argument("--split", default="test_vol", help="list of volumes to evaluate")
    parser.add_argument("--output_dir", default=None,
                        help="where results go (default: <checkpoint folder>/test)")
    parser.add_argument("--batch_size", type=int, default=32, help="slices per forward pass")
    parser.add_argument("--save_nifti", action="store_true", help="write predictions as NIfTI")
    parser.add_argument("--device", default="auto")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    checkpoint = Path(args.checkpoint or Path(args.run_dir) / CHECKPOINT_FINAL)
    output_dir = Path(args.output_dir or checkpoint.parent / "test")
    setup_logging()
    try:
        device = resolve_device(args.device)
        loaded = load_checkpoint(checkpoint, device)
        root = args.root_path or loaded.payload.get("train_config", {}).get("root_path")
        if root is None:
            raise ValueError(f"{checkpoint}: holds no data root; pass --root_path")
        layout = ProcessedLayout(Path(root), list_dir=Path(args.list_dir) if args.list_dir
                                 else None)
        names = layout.names(args.split)
        metrics = evaluate(loaded.model, layout, names, loaded.img_size, device,
                           batch_size=args.batch_size,
                           prediction_dir=output_dir / "predictions" if args.save_nifti else None)
    except (ValueError, OSError) as error:
        log.error("%s", error)
        return 1
    metrics.write_csv(output_dir / "per_case.csv")
    metrics.write_json(output_dir / "summary.json")
    print(f"{describe(loaded.model)}; {len(names)} volumes of {root}")
    print(metrics.format_table())
    print(f"results: {output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
