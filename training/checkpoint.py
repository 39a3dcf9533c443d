"""Self-describing training checkpoints that let ``--resume`` continue a run exactly.

A checkpoint holds the network record and weights (``test.py`` rebuilds the model from those
alone), the learning-rate schedule, the epoch and iteration reached, the validation tracker and
the run's config; a *resumable* one (``checkpoint_last.pth``) also holds the optimiser, the
gradient scaler and every random generator's state. The best and final checkpoints leave those
out: AdamW's two moments are twice the weights, so they would triple the file (3.5 GB instead of
1.2 GB for I_MMSeg on R50-ViT-B/16) for nothing that evaluation or prediction reads. Files are
written to a temporary name and renamed, so a run killed at any moment leaves the previous
checkpoint intact.

Exactness: everything random in an epoch is either a pure function of (seed, epoch, index)
(augmentation, sequence dropout, the sampler's shuffle) or drawn from the generators saved here
(network dropout), so a resumed run replays the interrupted epoch bit for bit on the same
machine and thread count.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from networks.variants import network_record
from utils import atomic_path, read_checkpoint

FORMAT_VERSION = 2
#: Train-config entries a resumed run may change: they do not alter what is computed.
RESUMABLE_CHANGES = frozenset({"device", "num_workers", "output_dir", "max_epochs"})
_REQUIRED = ("format_version", "network", "model", "optimizer", "scaler", "epoch", "iteration",
             "train_config", "rng")


def capture_rng_state() -> dict[str, Any]:
    """States of Python's, NumPy's and torch's global generators (CUDA ones when present)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_checkpoint(
    path: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    epoch: int,
    iteration: int,
    train_config: Mapping[str, Any],
    schedule: Mapping[str, Any],
    tracker: Mapping[str, Any] | None = None,
    priors: Mapping[str, Any] | None = None,
    preprocess: Mapping[str, Any] | None = None,
    resumable: bool = True,
) -> None:
    """Write what ``test.py`` and ``predict.py`` need and, when ``resumable``, a resumed run too.

    ``model`` is the bare network (not a DDP wrapper), so the keys carry no ``module.`` prefix.
    ``preprocess`` is the training data's preprocessing config (its manifests'), from which
    ``predict.py`` rebuilds the grid the network saw. Atomic.
    """
    payload = {
        "format_version": FORMAT_VERSION,
        "network": network_record(model),
        "priors": None if priors is None else dict(priors),
        "model": model.state_dict(),
        "schedule": dict(schedule),
        "epoch": epoch,
        "iteration": iteration,
        "tracker": None if tracker is None else dict(tracker),
        "train_config": dict(train_config),
        "preprocess": None if preprocess is None else dict(preprocess),
    }
    if resumable:
        payload.update(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                       rng=capture_rng_state())
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_training_checkpoint(path: Path, train_config: Mapping[str, Any],
                             defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read a checkpoint to resume ``train_config``'s run; refuse one of a different run.

    The configs must agree on everything but :data:`RESUMABLE_CHANGES`: resuming with another
    variant, backbone, batch size or loss weight would silently produce a different model. An
    entry missing from the saved config (written before the field existed) counts as its value
    in ``defaults``, the behaviour that run had.
    """
    path = Path(path)
    payload = read_checkpoint(path, missing="no checkpoint to resume from")
    missing = [key for key in _REQUIRED if key not in payload]
    if missing:
        raise ValueError(f"{path}: cannot resume from it (missing {missing}; a model-only "
                         "checkpoint, written by an older version or not by train.py)")
    saved = {**(defaults or {}), **payload["train_config"]}
    differing = sorted(key for key in set(saved) | set(train_config)
                       if key not in RESUMABLE_CHANGES
                       and _plain(saved.get(key)) != _plain(train_config.get(key)))
    if differing:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {train_config.get(k)!r}"
                            for k in differing)
        raise ValueError(f"{path}: written by a different run configuration ({details})")
    return payload


def _plain(value: Any) -> Any:
    """Tuples and lists compare equal (JSON round trips turn one into the other)."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value
