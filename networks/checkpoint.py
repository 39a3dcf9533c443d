"""The one checkpoint contract: file names, writing, reading and rebuilding the network.

Training writes, and test.py, predict.py, the registration segmenter of preprocessing and the
benchmarks read, through this module alone. A checkpoint holds the network record and weights
(:func:`load_checkpoint` rebuilds the model from those alone: no prompt file or npz needed), the
learning-rate schedule, the epoch and iteration reached, the validation tracker, the run's config,
the prior bank's identity and the training data's preprocessing (from which predict.py rebuilds
the grid the network saw). A *resumable* one (:data:`CHECKPOINT_LAST`) also holds the optimiser,
the gradient scaler and every random generator's state. The best and final checkpoints leave
those out: AdamW's two moments are twice the weights, so they would triple the file (3.5 GB
instead of 1.2 GB for I_MMSeg on R50-ViT-B/16) for nothing that evaluation or prediction reads.
Files are written to a temporary name and renamed, so a run killed at any moment leaves the
previous checkpoint intact.

Exactness of ``--resume``: everything random in an epoch is either a pure function of (seed,
epoch, index) (augmentation, sequence dropout, the sampler's shuffle) or drawn from the generators
saved here (network dropout), so a resumed run replays the interrupted epoch bit for bit on the
same machine and thread count.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from networks.ensemble import Ensemble
from networks.immseg_released import load_release_state_dict
from networks.variants import create_network, input_size, network_from_record, network_record
from prompts.bank import PriorBank
from utils import atomic_path, load_torch_file, non_finite_tensors

#: File names in a run folder: resumable state after every epoch, the end of training, and the
#: best validation score so far.
CHECKPOINT_LAST = "checkpoint_last.pth"
CHECKPOINT_FINAL = "checkpoint_final.pth"
CHECKPOINT_BEST = "checkpoint_best.pth"
FORMAT_VERSION = 2
#: Train-config entries a resumed run may change: they do not alter what is computed.
RESUMABLE_CHANGES = frozenset({"device", "num_workers", "output_dir", "max_epochs"})
_RESUME_KEYS = ("format_version", "network", "model", "optimizer", "scaler", "epoch",
                "iteration", "train_config", "rng")
_MODEL_KEYS = ("network", "model")


def read_checkpoint(path: str | Path, missing: str = "checkpoint not found") -> dict:
    """The dict a framework checkpoint holds; clear errors for absent, corrupt or foreign files.

    ``missing`` is the message for an absent file (what the caller was looking for).
    """
    payload = load_torch_file(path, "checkpoint", missing=missing, weights_only=False)
    if not isinstance(payload, dict):
        raise ValueError(f"{path}: not a checkpoint of this framework")
    return payload


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
    objective: Mapping[str, Any] | None = None,
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
        # ``objective``: the loss's own state (the tracked branch progress of --balance_sequences)
        payload.update(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                       rng=capture_rng_state(),
                       objective=None if objective is None else dict(objective))
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
    missing = [key for key in _RESUME_KEYS if key not in payload]
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


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A rebuilt network and the checkpoint it came from; ``payloads`` are every member's when
    several checkpoints make one ensemble (``payload`` is the first's)."""

    model: nn.Module
    payload: dict
    member_payloads: tuple[dict, ...] = ()

    @property
    def payloads(self) -> list[dict]:
        return list(self.member_payloads) or [self.payload]

    @property
    def img_size(self) -> int:
        return input_size(self.model)


def load_checkpoint(path: str | Path, device: torch.device) -> LoadedCheckpoint:
    """Rebuild the network described inside a checkpoint and load its weights (eval mode)."""
    path = Path(path)
    payload = read_checkpoint(path)
    if "network" not in payload and {"model_name", "model_config"} <= set(payload):
        # Written before variants existed: always an early-fusion TransUNet.
        payload["network"] = {"variant": "transunet", "name": payload["model_name"],
                              "config": payload["model_config"]}
    missing = [key for key in _MODEL_KEYS if key not in payload]
    if missing:
        raise ValueError(f"{path}: not a checkpoint of this framework (missing {missing})")
    broken = non_finite_tensors(payload["model"])
    if broken:
        raise ValueError(f"{path}: {len(broken)} weight tensor(s) hold NaN/Inf ({broken[0]}, "
                         "...); predictions from it would be meaningless")
    try:
        model = network_from_record(payload["network"], payload["model"])
    except (ValueError, KeyError, RuntimeError) as error:
        raise ValueError(f"{path}: cannot rebuild its network ({error})") from error
    return LoadedCheckpoint(model.to(device).eval(), payload)


def load_ensemble(paths: Sequence[str | Path], device: torch.device) -> LoadedCheckpoint:
    """One checkpoint, or several as an :class:`~networks.ensemble.Ensemble` (the first's
    payload describes it: its training data and preprocessing)."""
    loaded = [load_checkpoint(path, device) for path in paths]
    if len(loaded) == 1:
        return loaded[0]
    preprocess = {json.dumps(item.payload.get("preprocess"), sort_keys=True) for item in loaded}
    if len(preprocess) > 1:
        raise ValueError(f"{', '.join(map(str, paths))}: trained on differently preprocessed "
                         "data; their inputs differ and cannot be ensembled")
    return LoadedCheckpoint(Ensemble([item.model for item in loaded]).to(device).eval(),
                            loaded[0].payload, tuple(item.payload for item in loaded))


def load_release_weights(path: str | Path, priors: PriorBank, device: torch.device, *,
                         backbone: str = "R50-ViT-B_16", img_size: int = 128
                         ) -> LoadedCheckpoint:
    """The authors' weights (a state dict of the released I_MMSeg code, e.g. ``epoch_299.pth``)
    in :class:`~networks.immseg_released.IMMSegReleased`, with ``priors`` as its texts (eval
    mode). The payload names the file; it holds no training data or preprocessing."""
    path = Path(path)
    state = load_torch_file(path, "released I_MMSeg state dict")
    if isinstance(state, Mapping) and "model" in state and "network" in state:
        raise ValueError(f"{path}: a checkpoint of this framework; drop --variant")
    broken = non_finite_tensors(state) if isinstance(state, Mapping) else []
    if broken:
        raise ValueError(f"{path}: {len(broken)} weight tensor(s) hold NaN/Inf ({broken[0]}, ...)")
    model = create_network("immseg_released", backbone=backbone, img_size=img_size,
                           priors=priors)
    load_release_state_dict(model, state, str(path))
    payload = {"network": network_record(model), "model": model.state_dict(),
               "release_weights": str(path)}
    return LoadedCheckpoint(model.to(device).eval(), payload)


def fold_runs(run_dir: str | Path) -> list[Path]:
    """The ``fold<k>`` runs of a cross-validation folder, in fold order ([] for a plain run).

    Every fold must have finished: an ensemble or an out-of-fold score with a fold missing
    would silently be another experiment.
    """
    run_dir = Path(run_dir)
    found = sorted((p for p in run_dir.glob("fold*") if p.is_dir() and p.name[4:].isdigit()),
                   key=lambda p: int(p.name[4:]))
    if not found:
        return []
    # The fold count the runs were trained with, not the folders that happen to exist.
    counts = set()
    for fold in found:
        try:
            counts.add(int(json.loads((fold / "config.json").read_text())["folds"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    if len(counts) > 1:
        raise ValueError(f"{run_dir}: its folds were trained with different fold counts "
                         f"{sorted(counts)}")
    total = counts.pop() if counts else len(found)
    folds = [run_dir / f"fold{k}" for k in range(total)]
    unfinished = [str(p) for p in folds if not (p / CHECKPOINT_FINAL).is_file()]
    if unfinished:
        raise ValueError(f"{run_dir}: fold(s) without {CHECKPOINT_FINAL}: {unfinished} (train "
                         "them first: train.py --folds K --resume)")
    return folds


def run_checkpoints(run_dir: str | Path, name: str = CHECKPOINT_FINAL) -> list[Path]:
    """``name`` of a run folder, or of each fold of a cross-validation folder (in fold order)."""
    folds = fold_runs(run_dir)
    return [fold / name for fold in folds] if folds else [Path(run_dir) / name]
