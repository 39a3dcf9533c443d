"""Whole-volume inference: every slice of a volume goes through the network in large batches.

Three things are shared by every path through this module, so that batched, slice-by-slice and
test-time-augmented predictions differ only in how slices are grouped into forward passes:

* slices are resized (bilinear) to the network's ``img_size`` and the class probabilities resized
  back before the argmax, so labels live on the stored grid whatever its size;
* absent sequences follow :mod:`networks.sequences` (zeroed channel, plus ``sequence_mask`` for
  networks that take one); with every sequence present the plain forward runs, as in training;
* flip test-time augmentation averages *softmax probabilities* (not logits) over the four
  flips of :data:`FLIPS`, each flipped back onto the original orientation first.

:func:`window_probabilities` is the entry for stored [0, 255] windows (localisation, the ROI
pass, the registration segmenter): localisation fuses overlapping windows and the native mapping
interpolates, so they need probabilities, not labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datasets.labels import MODALITIES
from networks.sequences import forward_with_sequences, parse_sequences, presence_vector

#: Processed images are stored in [0, 255]; the network reads them divided by 255
#: (datasets.processed).
INPUT_SCALE = 255.0
#: Flip test-time augmentation: identity, horizontal (columns), vertical (rows), both. Each entry
#: names the dims of an ``[N, C, H, W]`` tensor to flip; a flip is its own inverse.
FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))


def _check_image(image: np.ndarray, batch_size: int) -> None:
    if image.ndim != 4 or len(image) == 0:
        raise ValueError(f"expected image [D, S, H, W] with D >= 1, got shape {image.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def _presence(sequences: Sequence[str] | None) -> Tensor | None:
    """``[S]`` bool presence of ``sequences``, or None when all are present (plain forward)."""
    if sequences is None:
        return None
    presence = presence_vector(parse_sequences(sequences))
    return None if bool(presence.all()) else presence


def _resize(batch: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(batch.shape[-2:]) == size:
        return batch
    return F.interpolate(batch, size=size, mode="bilinear", align_corners=False)


def _flip(batch: Tensor, dims: tuple[int, ...]) -> Tensor:
    return batch.flip(dims) if dims else batch


def _softmax(model: nn.Module, batch: Tensor, presence: Tensor | None) -> Tensor:
    """Softmax of one forward pass over ``batch [N, S, h, w]`` at the network's size."""
    mask = None if presence is None else presence.to(batch.device).expand(len(batch), -1)
    return torch.softmax(forward_with_sequences(model, batch, mask).float(), dim=1)


def _chunk_probabilities(model: nn.Module, chunk: Tensor, img_size: int,
                         presence: Tensor | None, tta: bool) -> Tensor:
    """Probabilities ``[n, K, H, W]`` for ``chunk [n, S, H, W]`` (all flips in one forward)."""
    size = tuple(chunk.shape[-2:])
    batch = _resize(chunk, (img_size, img_size))
    flips = FLIPS if tta else ((),)
    stacked = torch.cat([_flip(batch, dims) for dims in flips])
    outputs = _softmax(model, stacked, presence).split(len(batch))
    mean = torch.stack([_flip(out, dims) for out, dims in zip(outputs, flips, strict=True)])
    return _resize(mean.mean(dim=0), size)


@torch.no_grad()
def predict_probabilities(model: nn.Module, image: np.ndarray, img_size: int,
                          device: torch.device, batch_size: int = 32, *, tta: bool = False,
                          sequences: Sequence[str] | None = None) -> np.ndarray:
    """Class probabilities ``[D, K, H, W]`` (float32) for ``image [D, S, H, W]`` in [0, 1].

    ``batch_size`` bounds the images per forward pass; with ``tta`` the four flips of a slice
    share a pass, so ``batch_size // 4`` slices (at least one) go at a time. ``sequences`` names
    the sequences present (None: all). The caller puts the model in eval mode.
    """
    _check_image(image, batch_size)
    presence = _presence(sequences)
    per_pass = max(1, batch_size // len(FLIPS)) if tta else batch_size
    outputs = []
    for start in range(0, len(image), per_pass):
        chunk = torch.from_numpy(np.ascontiguousarray(image[start:start + per_pass]))
        chunk = chunk.to(device=device, dtype=torch.float32)
        outputs.append(_chunk_probabilities(model, chunk, img_size, presence, tta).cpu())
    return torch.cat(outputs).numpy()


def predict_volume(model: nn.Module, image: np.ndarray, img_size: int, device: torch.device,
                   batch_size: int = 32, *, tta: bool = False,
                   sequences: Sequence[str] | None = None) -> np.ndarray:
    """Label volume ``[D, H, W]`` (uint8): the argmax of :func:`predict_probabilities`."""
    probabilities = predict_probabilities(model, image, img_size, device, batch_size, tta=tta,
                                          sequences=sequences)
    return probabilities.argmax(axis=1).astype(np.uint8)


@torch.no_grad()
def predict_probabilities_slicewise(model: nn.Module, image: np.ndarray, img_size: int,
                                    device: torch.device, *, tta: bool = False,
                                    sequences: Sequence[str] | None = None) -> np.ndarray:
    """Reference for :func:`predict_probabilities`: one slice and one flip per forward pass.

    Written as the plain nested loop so that tests and ``bench/bench_inference.py`` have an
    independent baseline for the batched path's grouping of slices and flips.
    """
    _check_image(image, 1)
    presence = _presence(sequences)
    height, width = image.shape[-2:]
    slices = []
    for index in range(len(image)):
        x = torch.from_numpy(np.ascontiguousarray(image[index:index + 1]))
        x = _resize(x.to(device=device, dtype=torch.float32), (img_size, img_size))
        total = None
        for dims in FLIPS if tta else ((),):
            out = _flip(_softmax(model, _flip(x, dims), presence), dims)
            total = out if total is None else total + out
        assert total is not None
        mean = total / (len(FLIPS) if tta else 1)
        slices.append(_resize(mean, (height, width)).cpu().numpy())
    return np.concatenate(slices)


def predict_volume_slicewise(model: nn.Module, image: np.ndarray, img_size: int,
                             device: torch.device, *, tta: bool = False,
                             sequences: Sequence[str] | None = None) -> np.ndarray:
    """Label volume of :func:`predict_probabilities_slicewise` (the slow reference path)."""
    probabilities = predict_probabilities_slicewise(model, image, img_size, device, tta=tta,
                                                    sequences=sequences)
    return probabilities.argmax(axis=1).astype(np.uint8)


def window_probabilities(model: nn.Module, windows: np.ndarray, present: Sequence[str],
                         img_size: int, device: torch.device,
                         batch_size: int = 32, *, tta: bool = False) -> np.ndarray:
    """Softmax ``[N, K, h, w]`` (float32) for ``windows [N, S, h, w]`` in [0, 255].

    ``present`` names the given sequences; the others are zeroed and, for networks that take
    one, masked (:func:`networks.sequences.forward_with_sequences`). With every sequence present
    the plain forward is used, exactly as in training without sequence dropout. ``tta`` averages
    the four flips. The caller puts the model in eval mode.
    """
    if windows.ndim != 4 or windows.shape[1] != len(MODALITIES):
        raise ValueError(f"expected windows [N, {len(MODALITIES)}, h, w], got {windows.shape}")
    if img_size < 1:
        raise ValueError(f"img_size must be >= 1, got {img_size}")
    scaled = np.asarray(windows, dtype=np.float32) / np.float32(INPUT_SCALE)
    return predict_probabilities(model, scaled, img_size, device, batch_size, tta=tta,
                                 sequences=tuple(present))
