"""Learned non-rigid slice registration (step 4): a small 2D VoxelMorph-style network.

After slice-wise affine alignment the moving slices (bSSFP, T2w) still differ from the fixed LGE
slice by a smooth warp of a millimetre or two. A small U-Net looks at the concatenated
``(fixed, moving)`` pair and predicts a dense displacement; a spatial transformer resamples the
moving slice with it. The network is trained without ground truth on the dataset's own pairs by
maximising multi-modal similarity plus a diffusion smoothness penalty, saved, and reused.

This module holds the configuration, training, checkpoints and prediction. The network, its
spatial transformer and the displacement bound are in :mod:`preprocessing.voxelmorph_net`; the
NGF similarity and smoothness losses (and why NGF) in :mod:`preprocessing.voxelmorph_losses`.

Conventions match :mod:`preprocessing.transforms`: a displacement ``u [B, 2, H, W]`` holds
``(row, col)`` offsets in pixels and the warped image is ``moving(p + u(p))`` (pull mapping), so
:func:`predict_field` returns ``identity_field + u``, ready for ``compose_fields`` and ``warp``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from preprocessing.transforms import identity_field
from preprocessing.voxelmorph_losses import similarity_loss, smoothness_loss
from preprocessing.voxelmorph_net import VoxelMorph2D, VoxelMorphConfig
from utils import atomic_path, load_torch_file

#: Value of the ``kind`` entry that marks a checkpoint written by :func:`train_voxelmorph`.
CHECKPOINT_KIND = VoxelMorph2D.name
CHECKPOINT_VERSION = 1
#: Input intensities live in [0, INTENSITY_MAX] (the pipeline's normalised range).
INTENSITY_MAX = 255.0


# --------------------------------------------------------------------------------------------
# Training, checkpoints, prediction


def _as_unit_image(image: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(image, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{what} must be a 2D slice, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{what} holds non-finite values")
    return np.clip(array / INTENSITY_MAX, 0.0, 1.0).astype(np.float32)


def _stack_pairs(pairs: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray | None]],
                 multiple: int) -> list[np.ndarray]:
    """``[N, 1, H, W]`` fixed, moving (in [0, 1]) and mask weights, after checking every pair."""
    if len(pairs) == 0:
        raise ValueError("train_voxelmorph needs at least one (fixed, moving, mask) pair")
    columns: tuple[list[np.ndarray], ...] = ([], [], [])
    shape = None
    for i, pair in enumerate(pairs):
        if len(pair) != 3:
            raise ValueError(f"pair {i}: expected (fixed, moving, mask), got {len(pair)} items")
        fixed = _as_unit_image(pair[0], f"pair {i} fixed")
        moving = _as_unit_image(pair[1], f"pair {i} moving")
        shape = shape or fixed.shape
        if fixed.shape != shape or moving.shape != shape:
            raise ValueError(f"pair {i}: fixed {fixed.shape} and moving {moving.shape} must both "
                             f"be {shape} like the first pair")
        if shape[0] % multiple or shape[1] % multiple:
            raise ValueError(f"slice size {shape} must be a multiple of {multiple}")
        if pair[2] is None:
            weights = np.ones(shape, np.float32)
        else:
            weights = np.asarray(pair[2], dtype=np.float32)
            if weights.shape != shape:
                raise ValueError(f"pair {i}: mask {weights.shape} must match the slice {shape}")
            if not np.all(np.isfinite(weights)) or weights.min() < 0 or weights.sum() <= 0:
                raise ValueError(f"pair {i}: mask must be finite, non-negative and not empty")
        for column, array in zip(columns, (fixed, moving, weights), strict=True):
            column.append(array)
    return [np.stack(column)[:, None] for column in columns]


def _dihedral(batch: Tensor, code: int) -> Tensor:
    """One of the 8 flips/quarter turns of the slice plane (same for every tensor of a batch)."""
    if code & 4:
        batch = batch.transpose(2, 3)
    if code & 2:
        batch = batch.flip(2)
    if code & 1:
        batch = batch.flip(3)
    return batch


def _check_finite(loss: Tensor, iteration: int, parts: Mapping[str, Tensor]) -> None:
    if not torch.isfinite(loss):
        detail = ", ".join(f"{name}={float(value.detach()):.4g}" for name, value in parts.items())
        raise FloatingPointError(f"VoxelMorph loss is not finite at iteration {iteration} "
                                 f"({detail})")


def train_voxelmorph(pairs: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray | None]],
                     config: VoxelMorphConfig, device: torch.device | str,
                     checkpoint_path: Path | None = None, progress: bool = True,
                     provenance: Mapping[str, Any] | None = None) -> VoxelMorph2D:
    """Fit a :class:`VoxelMorph2D` to ``(fixed, moving, mask)`` slices without ground truth.

    Slices are [0, 255] and share one size (a multiple of ``config.size_multiple``); ``mask`` is
    a fixed-grid weight map (e.g. the dilated myocardium) or None for uniform weights. Batches
    are drawn with a generator seeded from ``config.seed``, optionally under a random flip or
    quarter turn (registration is equivariant to them, and it stretches a few hundred pairs).
    The model returned is in eval mode; with ``checkpoint_path`` its config, weights, optimiser,
    a training summary and ``provenance`` (JSON-able: what the pairs were made with, see
    :func:`checkpoint_provenance`) are written there atomically.

    Cost on CPU: about 3.5-4 s per 100 iterations at 128 x 128, batch 8, with one intra-op
    thread on a shared 2-core machine, where two threads ran 5-10x *slower*; callers on busy
    machines may want ``torch.set_num_threads(1)`` around this call.
    """
    if not isinstance(config, VoxelMorphConfig):
        raise ValueError(f"config must be a VoxelMorphConfig, got {type(config).__name__}")
    device = torch.device(device)
    fixed_all, moving_all, mask_all = (torch.from_numpy(a).to(device)
                                       for a in _stack_pairs(pairs, config.size_multiple))
    similarity = similarity_loss(config.similarity)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = VoxelMorph2D(config)
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    # Cosine decay to a tenth: the last iterations refine instead of jittering.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: 0.1 + 0.45 * (1 + math.cos(math.pi * it / config.iterations)))
    rng = np.random.default_rng(config.seed)
    num_pairs = fixed_all.shape[0]
    history: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(config.iterations), desc="voxelmorph", unit="it", disable=not progress)
    for iteration in bar:
        index = torch.from_numpy(rng.choice(num_pairs, size=config.batch_size,
                                            replace=num_pairs < config.batch_size)).to(device)
        code = int(rng.integers(8)) if config.augment else 0
        fixed, moving, mask = (_dihedral(t[index], code) for t in (fixed_all, moving_all,
                                                                    mask_all))
        warped, displacement = model(fixed, moving)
        sim = similarity(fixed, warped, config.ngf_epsilon, mask)
        smooth = smoothness_loss(displacement)
        loss = sim + config.smoothness_weight * smooth
        _check_finite(loss, iteration, {"similarity": sim, "smoothness": smooth})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        history.append(float(loss.detach()))
        if iteration % 10 == 0:
            bar.set_postfix(loss=f"{history[-1]:.4f}")
    seconds = time.perf_counter() - start
    model.eval()
    tail = history[-max(1, len(history) // 10):]
    summary = {"iterations": config.iterations, "num_pairs": num_pairs,
               "image_shape": list(fixed_all.shape[2:]), "seconds": seconds,
               "initial_loss": history[0], "final_loss": float(np.mean(tail)),
               "loss_history": history}
    if checkpoint_path is not None:
        payload = {"kind": CHECKPOINT_KIND, "version": CHECKPOINT_VERSION,
                   "model_name": model.name, "config": config.to_dict(),
                   "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
                   "training": summary, "provenance": dict(provenance or {})}
        with atomic_path(checkpoint_path) as tmp:
            torch.save(payload, tmp)
    return model


def checkpoint_provenance(path: str | Path) -> dict[str, Any]:
    """The ``provenance`` a checkpoint was trained with (empty if it records none).

    Raises like :func:`load_voxelmorph` for a missing, unreadable or foreign file.
    """
    return dict(_read_checkpoint(Path(path)).get("provenance") or {})


def _read_checkpoint(path: Path) -> dict[str, Any]:
    payload = load_torch_file(path, "VoxelMorph checkpoint")
    if not isinstance(payload, dict) or payload.get("kind") != CHECKPOINT_KIND:
        found = payload.get("kind") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path}: not a VoxelMorph checkpoint (kind {found!r}, "
                         f"expected {CHECKPOINT_KIND!r})")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: VoxelMorph checkpoint version {payload.get('version')!r}, "
                         f"this code reads {CHECKPOINT_VERSION}")
    return payload


def load_voxelmorph(path: str | Path, device: torch.device | str) -> VoxelMorph2D:
    """Rebuild the model stored by :func:`train_voxelmorph` from the checkpoint alone (eval mode).

    Raises FileNotFoundError for a missing file and ValueError for an unreadable one, a
    checkpoint of another kind, or weights whose names and shapes do not fit the stored config;
    every message names the file.
    """
    path = Path(path)
    payload = _read_checkpoint(path)
    missing = [key for key in ("config", "state_dict") if key not in payload]
    if missing:
        raise ValueError(f"{path}: VoxelMorph checkpoint lacks {missing}")
    try:
        model = VoxelMorph2D(VoxelMorphConfig.from_dict(payload["config"]))
        model.load_state_dict(payload["state_dict"], strict=True)
    except (ValueError, RuntimeError, TypeError) as error:
        raise ValueError(f"{path}: VoxelMorph checkpoint does not rebuild ({error})") from error
    return model.to(device).eval()


def predict_field(model: VoxelMorph2D, fixed: np.ndarray, moving: np.ndarray,
                  device: torch.device | str) -> np.ndarray:
    """The ``[2, H, W]`` float64 sampling field (fixed pixel -> moving position) for one pair.

    ``fixed`` and ``moving`` are [0, 255] slices of one size; the result is
    ``identity_field + displacement`` and plugs into ``transforms.compose_fields`` / ``warp``.
    The model is moved to ``device`` and left in eval mode.
    """
    fixed_unit = _as_unit_image(fixed, "fixed")
    moving_unit = _as_unit_image(moving, "moving")
    if fixed_unit.shape != moving_unit.shape:
        raise ValueError(f"fixed {fixed_unit.shape} and moving {moving_unit.shape} differ")
    device = torch.device(device)
    model = model.to(device).eval()
    with torch.inference_mode():
        displacement = model.displacement(torch.from_numpy(fixed_unit)[None, None].to(device),
                                          torch.from_numpy(moving_unit)[None, None].to(device))
    return identity_field(fixed_unit.shape) + displacement[0].double().cpu().numpy()
