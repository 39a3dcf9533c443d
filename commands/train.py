"""Train a segmentation network on the processed MyoPS layout.

    python train.py --dataset Myops --vit_name R50-ViT-B_16       # the release's command
    python train.py --model transunet --root_path data/phantom/Processed_data --max_epochs 20
    torchrun --nproc_per_node=4 train.py ...        # the same run on 4 GPUs (global batch)
    python train.py ... --resume                     # continue an interrupted run exactly
    python train.py ... --folds 5 [--fold 2]         # cross-validation: every fold (or one)
    python train.py --config runs/X/config.json --output_dir runs/Y   # a saved run's settings

Every setting below is a field of trainer.TrainConfig; a run writes them to its config.json.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from commands.config_flags import add_config_arguments, given_values, read_config_file
from datasets.folds import fold_list_dir
from datasets.processed import DEFAULT_PROCESSED_ROOT
from datasets.raw import DEFAULT_RAW_ROOT
from trainer import (
    CHECKPOINT_BEST,
    CHECKPOINT_FINAL,
    CHECKPOINT_LAST,
    DATASETS,
    LEGACY_DEFAULTS,
    TrainConfig,
    default_run_dir,
    train,
)
from utils import setup_logging

log = logging.getLogger("train")
#: Where the release's README puts the Google npz weights; used when present and not told.
RELEASE_PRETRAINED = "model/vit_checkpoint/imagenet21k/{vit_name}.npz"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None,
                        help="a run's config.json: its settings are the defaults, flags given "
                             "here change them")
    parser.add_argument("--resume", action="store_true",
                        help="continue <output_dir>/checkpoint_last.pth exactly")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in a folder that holds a run (its checkpoints are "
                             "removed when the new run writes its first one)")
    add_config_arguments(parser.add_argument_group("run settings (TrainConfig)"), TrainConfig)
    return parser


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """TrainConfig values: the field defaults, under ``--config``'s saved ones, under the flags
    given. The dataset decides the class count (and, unless given, the data root); a saved fold
    run's folder and lists are turned back into the cross-validation folder they came from."""
    # A setting a saved config lacks keeps the meaning it had when that run was written.
    saved = LEGACY_DEFAULTS | read_config_file(args.config, TrainConfig) if args.config else {}
    if saved.get("fold") is not None:
        run_dir = Path(saved["output_dir"])
        if run_dir.name == f"fold{saved['fold']}":
            saved["output_dir"] = str(run_dir.parent)
        root = Path(saved.get("root_path", TrainConfig.root_path))
        if saved.get("list_dir") == str(fold_list_dir(root / "lists", saved["folds"],
                                                      saved["fold"])):
            saved["list_dir"] = None
    values = {**saved, **given_values(args, TrainConfig)}
    dataset = DATASETS.get(values.get("dataset", TrainConfig.dataset))
    if dataset is not None:
        values.setdefault("root_path", dataset["root_path"])
        values["num_classes"] = dataset["num_classes"]
    if "pretrained_path" not in values:
        release = Path(RELEASE_PRETRAINED.format(
            vit_name=values.get("vit_name", TrainConfig.vit_name)))
        if release.is_file():
            values["pretrained_path"] = str(release)
    if not values.get("output_dir"):
        values["output_dir"] = default_run_dir(
            values.get("dataset", TrainConfig.dataset), values.get("model", TrainConfig.model),
            values.get("vit_name", TrainConfig.vit_name), values.get("folds", 0))
    return values


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        values = settings_of(args)
    except ValueError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    folds, chosen = values.get("folds", 0), values.pop("fold", None)
    if chosen is not None and not folds:
        print("train.py: error: --fold needs --folds", file=sys.stderr)
        return 2
    output_dir = values.pop("output_dir")
    for fold in ([chosen] if chosen is not None else list(range(folds))) if folds else [None]:
        run_dir = output_dir if fold is None else str(Path(output_dir) / f"fold{fold}")
        if fold is not None and args.resume and (Path(run_dir) / CHECKPOINT_FINAL).is_file():
            print(f"fold {fold}: finished ({Path(run_dir) / CHECKPOINT_FINAL}); skipped")
            continue
        # A fold that never started has nothing to resume: it starts.
        resume = args.resume and (fold is None or (Path(run_dir) / CHECKPOINT_LAST).is_file())
        code = _train_one({**values, "fold": fold, "output_dir": run_dir}, args, resume)
        if code:
            return code
    return 0


def _train_one(values: dict[str, Any], args: argparse.Namespace, resume: bool) -> int:
    main_rank = os.environ.get("RANK", "0") == "0"
    # Stderr first: a bad argument must not leave a run folder or log behind.
    setup_logging(level=logging.INFO if main_rank else logging.WARNING)
    output_dir = Path(values["output_dir"])
    try:
        config = TrainConfig(**values)
        check_inputs(config)
        if main_rank:
            claim_run_dir(output_dir, resume=resume, overwrite=args.overwrite)
            setup_logging(output_dir / "log.txt")
        result = train(config, resume=resume, replace=args.overwrite)
    except (ValueError, OSError, FloatingPointError) as error:
        log.error("%s", error)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted; %s holds the last finished epoch: continue with --resume",
                  output_dir / CHECKPOINT_LAST)
        return 130
    print(f"checkpoint: {result.checkpoint}")
    return 0


def check_inputs(config: TrainConfig) -> None:
    """Missing data or priors: one message naming the command that makes them, before a run
    folder is touched."""
    root = Path(config.root_path)
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root}: no 'train' data found (the folder does not exist). Make it from the raw "
            "NIfTI cases with "
            f"`python preprocess_data.py --raw_root <raw cases> --out_root {root}` (defaults: "
            f"{DEFAULT_RAW_ROOT} -> {DEFAULT_PROCESSED_ROOT}), or pass --root_path")
    if config.priors_path is not None and not Path(config.priors_path).is_file():
        raise FileNotFoundError(
            f"{config.priors_path}: prior bank not found. Encode the prompts with "
            f"`python -m prompts.encode --weights <BiomedCLIP folder> --out "
            f"{config.priors_path}` (the paper's text tower, from local files), or offline with "
            "`python -m prompts.encode --model minilm --out priors/minilm.pt` and pass "
            "--priors_path priors/minilm.pt")


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
