"""Evaluate trained networks on held-out volumes, label-free: Dice and HD95 per group.

    python test.py --run_dir runs/Myops_immseg_R50-ViT-B_16          # its test list
    python test.py --run_dir runs/myops2020_cv/immseg                 # cross-validation: every
                                                                      # case out of fold
    python test.py --run_dir runs/myops2020_cv/immseg --ensemble --root_path /data/external
    python test.py --checkpoint a.pth b.pth ... [--tta] [--sequences LGE,T2w | --all_subsets]

Test volumes written by preprocess_data.py are predicted exactly as predict.py predicts a new
patient (heart found by the network on the whole grid, registration as in training, ROI), their
labels read only to score: on the processed grid and, when the raw files are at hand, in native
space on the labelled sequence's grid against the raw label. Volumes in the release's processed
layout (a 128 ROI someone cut) are predicted as they are and reported as "ROI given".

Writes per_case.csv, native_per_case.csv, summary.json and dice_boxplot.png to --output_dir;
with --all_subsets one such folder per sequence subset plus subsets.csv / subsets.json.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from commands.config_flags import add_config_arguments
from commands.options import (
    add_checkpoint_arguments,
    add_prediction_arguments,
    checkpoint_paths,
    load_models,
    predict_config,
)
from datasets.labels import MODALITIES
from datasets.processed import ProcessedLayout, case_of
from evaluation.agreement import format_agreement
from evaluation.evaluate import (
    Scores,
    all_subsets,
    evaluate_subsets,
    format_subset_table,
    subset_label,
    write_results,
    write_subset_table,
)
from networks.sequences import parse_sequences
from networks.variants import describe
from prediction.pipeline import registration_networks
from trainer import TrainConfig, default_run_dir
from utils import resolve_device, setup_logging

log = logging.getLogger("test")
#: The train.py settings that name its run folder (trainer.default_run_dir).
RUN_NAMING = ("dataset", "model", "vit_name", "folds")

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(parser, required=False)
    found = parser.add_argument_group(
        "the run train.py wrote with the same flags (used without --checkpoint and --run_dir: "
        "runs/<dataset>_<model>_<vit_name>[_cv<K>])")
    add_config_arguments(found, TrainConfig, only=frozenset(RUN_NAMING))
    parser.add_argument("--ensemble", action="store_true",
                        help="with a cross-validation folder: all folds as one model (mean of "
                             "softmax) on --split, instead of each fold on its own test cases")
    parser.add_argument("--root_path", default=None,
                        help="processed data root (default: the one the model was trained on)")
    parser.add_argument("--list_dir", default=None,
                        help="lists folder (default: the run's own, i.e. its fold's lists)")
    parser.add_argument("--split", default="test_vol", help="list of volumes to evaluate")
    parser.add_argument("--output_dir", default=None,
                        help="where results go (default: <run or checkpoint folder>/test)")
    parser.add_argument("--save_nifti", action="store_true",
                        help="write <name>_pred (processed grid), <name>_native_pred (native "
                             "grid), _gt and the input sequences as NIfTI files; with "
                             "--all_subsets the label and inputs go once to reference/")
    subsets = parser.add_mutually_exclusive_group()
    subsets.add_argument("--sequences", default=None,
                         help=f"comma-separated sequences given to the network, the others "
                              f"zeroed (default: all of {','.join(MODALITIES)})")
    subsets.add_argument("--all_subsets", action="store_true",
                         help="evaluate every non-empty subset of the sequences")
    add_prediction_arguments(parser)
    return parser


def trained_run_dir(args: argparse.Namespace) -> str:
    """The folder train.py writes for the run-naming flags given here (the release's
    ``python test.py --dataset Myops --vit_name R50-ViT-B_16`` finds its training run)."""
    naming = {name: getattr(args, name, getattr(TrainConfig, name)) for name in RUN_NAMING}
    run_dir = default_run_dir(naming["dataset"], naming["model"], naming["vit_name"],
                              naming["folds"])
    if not Path(run_dir).is_dir():
        flags = " ".join(f"--{name} {value}" for name, value in naming.items()
                         if name != "folds" or value)
        raise FileNotFoundError(f"{run_dir}: no run; train it first (python train.py {flags}) "
                                "or pass --run_dir / --checkpoint")
    return run_dir


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        subsets = (all_subsets() if args.all_subsets
                   else [parse_sequences(MODALITIES if args.sequences is None
                                         else args.sequences)])
    except ValueError as error:
        log.error("--sequences %r: %s", args.sequences, error)
        return 1
    try:
        if not args.checkpoint and not args.run_dir:
            args.run_dir = trained_run_dir(args)
        paths = checkpoint_paths(args)
        device = resolve_device(args.device)
        # Out of fold: each fold's model on its own test cases; otherwise one (ensembled) model.
        out_of_fold = args.run_dir is not None and len(paths) > 1 and not args.ensemble
        groups = [[path] for path in paths] if out_of_fold else [paths]
        output_dir = Path(args.output_dir or (Path(args.run_dir) if args.run_dir
                                              else paths[0].parent) / "test")
        folders = {subset: output_dir / subset_label(subset) if args.all_subsets else output_dir
                   for subset in subsets}
        results: dict[tuple[str, ...], Scores] = {subset: Scores() for subset in subsets}
        evaluated: list[str] = []
        for members in groups:
            loaded = load_models(args, members, device)
            config, source = predict_config(args, loaded.payload)
            log.info("%s; preprocessing from %s", describe(loaded.model), source)
            train = loaded.payload.get("train_config") or {}
            root = args.root_path or train.get("root_path")
            if root is None:
                raise ValueError(f"{members[0]}: holds no data root; pass --root_path")
            list_dir = args.list_dir or (None if args.ensemble else train.get("list_dir"))
            layout = ProcessedLayout(Path(root), list_dir=Path(list_dir) if list_dir else None)
            names = layout.names(args.split)
            _warn_if_trained_on(names, loaded.payloads, members)
            found = evaluate_subsets(
                loaded.model, layout, names, loaded.img_size, device, subsets,
                config=config, networks=registration_networks(loaded.payload, config.preprocess,
                                                              device, args.segmenter),
                prediction_dirs={s: f / "predictions" for s, f in folders.items()}
                if args.save_nifti else None,
                reference_dir=output_dir / "reference" if args.save_nifti and args.all_subsets
                else None)
            for subset, scores in found.items():
                results[subset].extend(scores)
            evaluated.extend(names)
            model = describe(loaded.model)
    except (ValueError, OSError) as error:
        log.error("%s", error)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted; no results were written")
        return 130
    kind = (f"out of fold over {len(paths)} folds" if out_of_fold
            else f"ensemble of {len(paths)}" if len(paths) > 1 else "one model")
    settings = {"checkpoints": [str(p) for p in paths], "evaluation": kind,
                "root_path": str(root), "split": args.split, "tta": args.tta,
                "register": args.register, "model": model}
    try:
        for subset, scores in results.items():
            write_results(folders[subset], scores,
                          {**settings, "sequences": list(subset)},
                          title=f"{model}\n{subset_label(subset)}{' + TTA' if args.tta else ''}")
        if args.all_subsets:
            write_subset_table(output_dir, results, settings)
    except OSError as error:
        log.error("cannot write results to %s: %s", output_dir, error)
        return 1
    print(f"{model}; {kind}; {len(evaluated)} volumes of {root}"
          f"{'; flip TTA' if args.tta else ''}")
    if args.all_subsets:
        print(format_subset_table(results))
    else:
        (subset,) = subsets
        scores = results[subset]
        print(f"sequences: {subset_label(subset)}")
        print(f"Scores in {scores.describe()}:")
        print(scores.headline.format_table())
        print("Volumes, prediction against label:")
        print(format_agreement(scores.headline.volume_agreement()))
        if scores.space == "native":
            print("On the processed grid:")
            print(scores.grid.format_table())
    print(f"results: {output_dir}")
    return 0


def _warn_if_trained_on(names: list[str], payloads: list[dict], paths: list[Path]) -> None:
    """Warn when a test case is in a member's training list (e.g. an ensemble of folds scored
    on the cases of the same cross-validation)."""
    for payload, path in zip(payloads, paths, strict=True):
        train = payload.get("train_config") or {}
        list_dir = train.get("list_dir") or Path(train.get("root_path", ".")) / "lists"
        train_list = Path(list_dir) / "train.txt"
        if not train_list.is_file():
            continue
        trained = {case_of(line.strip()) for line in train_list.read_text().splitlines()}
        leaked = sorted(set(names) & trained)
        if leaked:
            log.warning("%s trained on %d of the test cases (%s...): these scores are not "
                        "held-out", path, len(leaked), ", ".join(leaked[:3]))


if __name__ == "__main__":
    sys.exit(main())
