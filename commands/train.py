"""Train a segmentation network on the processed MyoPS layout.

    python train.py --dataset Myops --model immseg --vit_name R50-ViT-B_16 \
        --priors_path priors/biomedclip.pt --root_path data/phantom/Processed_data
    torchrun --nproc_per_node=4 train.py ...        # the same run on 4 GPUs (global batch)
    python train.py ... --resume                     # continue an interrupted run exactly
    python train.py ... --folds 5 [--fold 2]         # cross-validation: every fold (or one)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from datasets.labels import MODALITIES
from networks.backbones import list_backbones
from networks.objective import SCHEDULES
from networks.prior_attention import CROSS_ATTENTION, PixelPairAttention
from networks.variants import VARIANTS
from trainer import (
    CHECKPOINT_BEST,
    CHECKPOINT_FINAL,
    CHECKPOINT_LAST,
    DATASETS,
    DEFAULT_PRIORS_PATH,
    TrainConfig,
    train,
)
from utils import setup_logging

log = logging.getLogger("train")


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=defaults.dataset, choices=sorted(DATASETS))
    parser.add_argument("--model", default=defaults.model, choices=sorted(VARIANTS),
                        help="network variant: " + "; ".join(f"{k}: {v.description}"
                                                             for k, v in VARIANTS.items()))
    parser.add_argument("--vit_name", default=defaults.vit_name, choices=list_backbones(),
                        help="encoder backbone of every variant")
    parser.add_argument("--priors_path", default=None,
                        help="prior bank (.pt) from `python -m prompts.encode`; immseg only "
                             f"(default {DEFAULT_PRIORS_PATH})")
    parser.add_argument("--sequence", default=defaults.sequence, choices=MODALITIES,
                        help="input of the transunet_single variant")
    parser.add_argument("--share_encoder", action="store_true",
                        help="immseg: one encoder for all sequences")
    parser.add_argument("--cross_attention", choices=CROSS_ATTENTION,
                        default=defaults.cross_attention,
                        help="immseg: how sequences exchange information at the bottleneck: "
                             "sequence (ours: attention over the 3 sequences at each pixel) or "
                             "pixel (the release's: every pixel against every pixel of the "
                             "other sequences)")
    parser.add_argument("--pixel_values", choices=PixelPairAttention.VALUES,
                        default=defaults.pixel_values,
                        help="with --cross_attention pixel: aggregate the sequence's own "
                             "features (as released) or the partner's")
    parser.add_argument("--root_path", default=None,
                        help="processed data root (default: the dataset's default root)")
    parser.add_argument("--list_dir", default=None, help="lists folder (default: <root>/lists)")
    parser.add_argument("--folds", type=int, default=0,
                        help="K-fold cross-validation over the lists preprocess_data.py wrote "
                             "(lists/cv<K>/); runs go to <output_dir>/fold<k>")
    parser.add_argument("--fold", type=int, default=None,
                        help="the fold to train (default with --folds: every fold, one after "
                             "the other; with --resume finished folds are skipped)")
    parser.add_argument("--output_dir", default=None,
                        help="run folder (default: runs/<dataset>_<model>_<vit_name>)")
    parser.add_argument("--img_size", type=int, default=defaults.img_size)
    parser.add_argument("--batch_size", type=int, default=defaults.batch_size)
    parser.add_argument("--optimizer", default=defaults.optimizer, choices=("adamw", "sgd"))
    parser.add_argument("--base_lr", type=float, default=defaults.base_lr)
    parser.add_argument("--weight_decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--max_epochs", type=int, default=defaults.max_epochs)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--num_workers", type=int, default=defaults.num_workers)
    parser.add_argument("--pretrained_path", default=None,
                        help="Google R50+ViT-B_16.npz (local file) to initialise the encoder")
    parser.add_argument("--ce_weight", type=float, default=defaults.ce_weight)
    parser.add_argument("--dice_weight", type=float, default=defaults.dice_weight)
    parser.add_argument("--aux_weight", type=float, default=defaults.aux_weight,
                        help="per-sequence deep supervision (immseg variants)")
    parser.add_argument("--contrastive_weight", type=float, default=defaults.contrastive_weight)
    parser.add_argument("--contrastive_start_epoch", type=int,
                        default=defaults.contrastive_start_epoch,
                        help="0-based epoch from which the pixel-text contrastive term counts")
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--loss_schedule", choices=SCHEDULES, default=defaults.loss_schedule,
                        help="constant (ours): one stage; release_staged: the released code's "
                             "first third of the epochs on the per-sequence branches alone, "
                             "then all terms (weights 1, 0.5 x sum, 0.05)")
    parser.add_argument("--class_weights", type=float, nargs="+", default=None,
                        help="cross-entropy weight per class (background, myocardium, scar, "
                             "edema)")
    parser.add_argument("--vit_dropout", type=float, default=None,
                        help="transformer dropout (default: the backbone's, 0.1)")
    parser.add_argument("--val_every", type=int, default=defaults.val_every,
                        help="validate every N epochs (0: no validation)")
    parser.add_argument("--val_fraction", type=float, default=defaults.val_fraction,
                        help="share of the training cases held out for validation")
    parser.add_argument("--patience", type=int, default=None,
                        help="stop after this many validations without a better model")
    parser.add_argument("--no_amp", action="store_true",
                        help="no float16 autocast on CUDA (never used on the CPU)")
    parser.add_argument("--no_augment", action="store_true", help="disable augmentation")
    parser.add_argument("--sequence_dropout", type=float, default=defaults.sequence_dropout,
                        help="probability that a training slice loses 1 or 2 of its 3 sequences "
                             "(zeroed; immseg variants also get the presence mask), so the model "
                             "learns to segment with missing sequences; not for transunet_single")
    parser.add_argument("--sequence_jitter", type=float, default=defaults.sequence_jitter,
                        help="probability that bSSFP and T2w, each on its own, are moved off "
                             "LGE and the label by a random misalignment (rotation up to 8 deg, "
                             "shift 5 mm, scale 5 %%, a 1.5 mm smooth field): training for "
                             "sequences that registration leaves misaligned")
    parser.add_argument("--device", default=defaults.device, help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--resume", action="store_true",
                        help="continue <output_dir>/checkpoint_last.pth exactly")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in a folder that holds a run (its checkpoints are "
                             "removed when the new run writes its first one)")
    return parser


def default_output_dir(args: argparse.Namespace) -> str:
    """``runs/<dataset>_<model>_<vit_name>`` (``_cv<K>`` appended for cross-validation)."""
    folds = f"_cv{args.folds}" if args.folds else ""
    return f"runs/{args.dataset}_{args.model}_{args.vit_name}{folds}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    output_dir = args.output_dir or default_output_dir(args)
    if args.fold is not None and not args.folds:
        print("train.py: error: --fold needs --folds", file=sys.stderr)
        return 2
    folds = ([args.fold] if args.fold is not None else list(range(args.folds))) if args.folds \
        else [None]
    for fold in folds:
        run_dir = output_dir if fold is None else str(Path(output_dir) / f"fold{fold}")
        if fold is not None and args.resume and (Path(run_dir) / CHECKPOINT_FINAL).is_file():
            print(f"fold {fold}: finished ({Path(run_dir) / CHECKPOINT_FINAL}); skipped")
            continue
        # A fold that never started has nothing to resume: it starts.
        resume = args.resume and (fold is None or (Path(run_dir) / CHECKPOINT_LAST).is_file())
        code = _train_one(args, run_dir, fold, resume)
        if code:
            return code
    return 0


def _train_one(args: argparse.Namespace, output_dir: str, fold: int | None,
               resume: bool) -> int:
    main_rank = os.environ.get("RANK", "0") == "0"
    # Stderr first: a bad argument must not leave a run folder or log behind.
    setup_logging(level=logging.INFO if main_rank else logging.WARNING)
    try:
        config = TrainConfig(
            dataset=args.dataset, model=args.model, vit_name=args.vit_name,
            priors_path=args.priors_path, sequence=args.sequence,
            share_encoder=args.share_encoder, cross_attention=args.cross_attention,
            pixel_values=args.pixel_values,
            root_path=args.root_path or DATASETS[args.dataset]["root_path"],
            list_dir=args.list_dir, folds=args.folds, fold=fold, output_dir=output_dir,
            img_size=args.img_size,
            num_classes=DATASETS[args.dataset]["num_classes"], batch_size=args.batch_size,
            optimizer=args.optimizer, base_lr=args.base_lr, weight_decay=args.weight_decay,
            max_epochs=args.max_epochs,
            seed=args.seed, num_workers=args.num_workers, pretrained_path=args.pretrained_path,
            ce_weight=args.ce_weight, dice_weight=args.dice_weight, aux_weight=args.aux_weight,
            contrastive_weight=args.contrastive_weight,
            contrastive_start_epoch=args.contrastive_start_epoch,
            temperature=args.temperature, loss_schedule=args.loss_schedule,
            augment=not args.no_augment,
            sequence_dropout=args.sequence_dropout, sequence_jitter=args.sequence_jitter,
            class_weights=tuple(args.class_weights) if args.class_weights else None,
            vit_dropout=args.vit_dropout, val_every=args.val_every,
            val_fraction=args.val_fraction, patience=args.patience, amp=not args.no_amp,
            device=args.device)
        if main_rank:
            claim_run_dir(Path(output_dir), resume=resume, overwrite=args.overwrite)
            setup_logging(Path(output_dir) / "log.txt")
        result = train(config, resume=resume, replace=args.overwrite)
    except (ValueError, OSError, FloatingPointError) as error:
        log.error("%s", error)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted; %s holds the last finished epoch: continue with --resume",
                  Path(output_dir) / CHECKPOINT_LAST)
        return 130
    print(f"checkpoint: {result.checkpoint}")
    return 0


def claim_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to start a new run over a folder that holds one, unless asked.

    ``--resume`` continues it; ``--overwrite`` starts afresh (the trainer removes the old run's
    checkpoints when the new run writes its first one, so a failed start destroys nothing and
    no old ``checkpoint_best.pth`` survives beside the new run's). A path that is a file fails
    here with its name.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"{run_dir}: is a file, not a run folder")
    # Checkpoints are what a run has to lose; a config.json alone (a run killed in its first
    # epoch) is rewritten by the new one.
    old = [run_dir / name for name in (CHECKPOINT_LAST, CHECKPOINT_FINAL, CHECKPOINT_BEST)
           ] if run_dir.is_dir() else []
    old = [path for path in old if path.exists()]
    if resume or not old:
        return
    if not overwrite:
        raise ValueError(f"{run_dir}: holds a run ({', '.join(p.name for p in old)}); pass "
                         "--resume to continue it, --overwrite to replace it, or another "
                         "--output_dir")


if __name__ == "__main__":
    sys.exit(main())
