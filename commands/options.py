"""Command-line settings of the label-free path, shared by test.py and predict.py: which
checkpoints, and how the path runs.

Both scripts build their :class:`~prediction.pipeline.PredictConfig` here, from the training
data's preprocessing and the same flags, so a test score is obtained exactly as a user's
prediction is.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from commands.config_flags import add_config_arguments, given_values
from datasets.labels import MODALITIES
from networks.backbones import list_backbones
from networks.checkpoint import (
    CHECKPOINT_FINAL,
    LoadedCheckpoint,
    load_ensemble,
    load_release_weights,
    run_checkpoints,
)
from prediction.pipeline import PredictConfig, preprocess_config_for
from preprocessing.affine_pooling import AFFINE_POOLINGS
from prompts.bank import load_prior_bank, load_released_priors

REGISTER_CHOICES = ("auto", "on", "off")


def add_checkpoint_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """``--checkpoint FILE [FILE ...]`` or ``--run_dir DIR`` (one of them, or neither where the
    program finds the run otherwise), for test.py and predict.py. Several checkpoints, or a
    cross-validation folder, are used as an ensemble where one model is asked for."""
    where = parser.add_mutually_exclusive_group(required=required)
    where.add_argument("--checkpoint", nargs="+",
                       help="checkpoint file(s) written by train.py; several are ensembled "
                            "(mean of softmax)")
    where.add_argument("--run_dir",
                       help=f"run folder of train.py (uses {CHECKPOINT_FINAL}), or a "
                            "cross-validation folder holding fold<k>/ runs")
    release = parser.add_argument_group(
        "the released I_MMSeg code's weights (a state dict such as epoch_299.pth)")
    release.add_argument("--variant", choices=("immseg_released",), default=None,
                         help="read --checkpoint as a state dict of the released network")
    release.add_argument("--release_priors", default=None,
                         help="its text embeddings: the release's text_features/ folder (rows "
                              "fed by index, as the authors trained) or a prior bank of ours")
    release.add_argument("--release_backbone", default="R50-ViT-B_16", choices=list_backbones(),
                         help="encoder size the weights were trained with")
    release.add_argument("--release_img_size", type=int, default=128,
                         help="slice size the weights were trained with")


def load_models(args: argparse.Namespace, paths: list[Path],
                device: torch.device) -> LoadedCheckpoint:
    """The network(s) the flags name: our checkpoints (several make an ensemble), or with
    ``--variant immseg_released`` one state dict of the released code."""
    if not getattr(args, "variant", None):
        return load_ensemble(paths, device)
    if len(paths) != 1:
        raise ValueError("--variant immseg_released reads one state dict (--checkpoint FILE)")
    if not args.release_priors:
        raise ValueError("--variant immseg_released needs --release_priors: the release's "
                         "text_features/ folder or a prior bank")
    source = Path(args.release_priors)
    priors = (load_released_priors(source, normalize=False, order=MODALITIES)
              if source.is_dir() else load_prior_bank(source))
    return load_release_weights(paths[0], priors, device, backbone=args.release_backbone,
                                img_size=args.release_img_size)


def checkpoint_paths(args: argparse.Namespace) -> list[Path]:
    """The checkpoints named by :func:`add_checkpoint_arguments`' flags (folds in order)."""
    if args.checkpoint:
        return [Path(path) for path in args.checkpoint]
    return run_checkpoints(args.run_dir)


def checkpoint_path(args: argparse.Namespace) -> Path:
    """The one checkpoint named by the flags (the first of several)."""
    return checkpoint_paths(args)[0]


def add_prediction_arguments(parser: argparse.ArgumentParser) -> None:
    """How the label-free path runs (shared with predict.py)."""
    parser.add_argument("--register", nargs="?", const="on", default="auto",
                        choices=REGISTER_CHOICES,
                        help="register the other sequences onto LGE before the final pass: "
                             "auto (default) as the training data were (metric, non-rigid "
                             "step), on: the affine step even if they were not, off: never")
    parser.add_argument("--affine_pooling", default=None, choices=AFFINE_POOLINGS,
                        help="how the slices' affine fits are pooled over the stack (default: "
                             "as the training data were; preprocessing.affine_pooling)")
    parser.add_argument("--segmenter", default=None,
                        help="checkpoint for registration data made with --affine_metric "
                             "segmentation")
    add_config_arguments(parser, PredictConfig, fill_defaults=True)
    parser.add_argument("--device", default="auto")


def predict_config(args: argparse.Namespace, payload: dict,
                   overrides: dict | None = None) -> tuple[PredictConfig, str]:
    """The label-free path's settings: the training data's preprocessing (from the checkpoint
    or the training manifests), ``overrides`` and the flags."""
    overrides = dict(overrides or {}) | {"affine_pooling": getattr(args, "affine_pooling", None)}
    preprocess, source = preprocess_config_for(payload, overrides)
    register = args.register
    if register == "auto" and source == "defaults":
        # Nothing says how the training data were registered: do not guess.
        register = "off"
    if register == "off":
        preprocess = dataclasses.replace(preprocess, affine_registration=False,
                                         nonrigid_registration=False)
    elif register == "on":
        preprocess = dataclasses.replace(preprocess, affine_registration=True)
    return PredictConfig(preprocess=preprocess, register=register != "off",
                         **given_values(args, PredictConfig)), source
