"""Learned non-rigid slice registration (step 4): a small 2D VoxelMorph-style network.

After slice-wise affine alignment the moving slices (bSSFP, T2w) still differ from the fixed LGE
slice by a smooth warp of a millimetre or two. A small U-Net looks at the concatenated
``(fixed, moving)`` pair and predicts a dense displacement; a spatial transformer resamples the
moving slice with it. The network is trained without ground truth on the dataset's own pairs by
maximising multi-modal similarity plus a diffusion smoothness penalty, saved, and reused.

Conventions match :mod:`preprocessing.transforms`: a displacement ``u [B, 2, H, W]`` holds
``(row, col)`` offsets in pixels and the warped image is ``moving(p + u(p))`` (pull mapping), so
:func:`predict_field` returns ``identity_field + u``, ready for ``compose_fields`` and ``warp``.

Similarity: normalised gradient fields (NGF). The three sequences image the same boundaries with
unrelated and even inverted contrast (blood is bright in bSSFP, grey in LGE, dark in T2w), so an
intensity-matching loss is wrong here. NGF compares only the *orientation* of intensity edges,
squared so that an edge of flipped polarity agrees perfectly. We prefer it to MIND descriptors
because the misalignment is small (edges still overlap, so NGF's narrow capture range is
enough), it costs two finite differences instead of a dozen shifted patch distances per pixel,
it has no patch size or offset layout to tune, and its one parameter (the edge-noise level
``epsilon``) has a plain meaning on [0, 1] intensities: gradients well below it count as noise
(the default 0.05 is a few times the per-pixel gradient noise of a typical slice). It is weighted
by an optional fixed-grid mask (the dilated myocardium) so that the loss follows the anatomy we
segment.

Each displacement vector is soft-clamped to a length ``m * tanh(|raw| / m)`` below
``m = max_displacement_px``: a poorly trained model can only move pixels a few millimetres, never
fold the slice wholesale. With
``integration_steps > 0`` the output is a stationary velocity integrated by scaling and squaring,
which gives a diffeomorphic (fold-free up to discretisation) map under the same bound.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from preprocessing.transforms import identity_field
from utils import atomic_path, require_finite_fields

#: Value of the ``kind`` entry that marks a checkpoint written by :func:`train_voxelmorph`.
CHECKPOINT_KIND = "voxelmorph2d"
CHECKPOINT_VERSION = 1
SIMILARITIES = ("ngf",)
#: Input intensities live in [0, INTENSITY_MAX] (the pipeline's normalised range).
INTENSITY_MAX = 255.0
#: Scaling and squaring beyond this many steps changes nothing measurable at slice sizes.
MAX_INTEGRATION_STEPS = 16


@dataclass(frozen=True)
class VoxelMorphConfig:
    """Network, loss and training settings. ``to_dict`` is stored in every checkpoint.

    ``encoder_channels[i]`` is the width after the ``i``-th stride-2 convolution, so images must
    be a multiple of ``2 ** len(encoder_channels)`` (16 by default). ``decoder_channels[i]`` is
    the width after the ``i``-th upsampling step. With fewer decoder than encoder levels the
    displacement is predicted at ``1 / 2 ** (len(encoder) - len(decoder))`` resolution and
    upsampled bilinearly: the misalignment is smooth, and the full-resolution convolutions are
    the most expensive ones.
    """

    encoder_channels: tuple[int, ...] = (16, 32, 32, 32)
    decoder_channels: tuple[int, ...] = (32, 32)
    max_displacement_px: float = 4.0
    smoothness_weight: float = 1.0
    similarity: str = "ngf"
    ngf_epsilon: float = 0.05
    integration_steps: int = 0
    iterations: int = 1500
    batch_size: int = 8
    learning_rate: float = 3e-3
    augment: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("encoder_channels", "decoder_channels"):
            value = getattr(self, name)
            if isinstance(value, str | bytes) or not isinstance(value, Sequence) or not value:
                raise ValueError(f"{name} must be a non-empty sequence of ints, got {value!r}")
            object.__setattr__(self, name, tuple(value))
            for i, width in enumerate(getattr(self, name)):
                _check_int(f"{name}[{i}]", width, minimum=1)
        if len(self.decoder_channels) > len(self.encoder_channels):
            raise ValueError("decoder_channels needs at most one entry per encoder level: got "
                             f"{self.decoder_channels} for {self.encoder_channels}")
        require_finite_fields(self, "max_displacement_px", "ngf_epsilon", "learning_rate",
                              positive=True)
        require_finite_fields(self, "smoothness_weight")
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"unknown similarity {self.similarity!r}; known: {SIMILARITIES}")
        _check_int("integration_steps", self.integration_steps, minimum=0)
        if self.integration_steps > MAX_INTEGRATION_STEPS:
            raise ValueError(f"integration_steps must be <= {MAX_INTEGRATION_STEPS}, "
                             f"got {self.integration_steps}")
        _check_int("iterations", self.iterations, minimum=1)
        _check_int("batch_size", self.batch_size, minimum=1)
        _check_int("seed", self.seed, minimum=0)
        if not isinstance(self.augment, bool):
            raise ValueError(f"augment must be a bool, got {self.augment!r}")

    @property
    def size_multiple(self) -> int:
        """Image height and width must be multiples of this (one halving per encoder level)."""
        return 2 ** len(self.encoder_channels)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> VoxelMorphConfig:
        """Inverse of :meth:`to_dict`; unknown keys are named rather than silently dropped."""
        if not isinstance(values, Mapping):
            raise ValueError(f"VoxelMorphConfig expects a mapping, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown VoxelMorphConfig keys: {unknown}; known: {sorted(known)}")
        return cls(**values)


def _check_int(name: str, value: Any, minimum: int) -> None:
    # bool is an int subclass; True as a count is always a mistake.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


# --------------------------------------------------------------------------------------------
# Spatial transformer


def sample_at(image: Tensor, rows: Tensor, cols: Tensor, *, mode: str = "bilinear",
              padding: str = "zeros") -> Tensor:
    """Sample ``image [B, C, H, W]`` at pixel positions ``rows, cols [B, H', W']``.

    ``padding="zeros"`` gives 0 wherever a position leaves ``[0, H-1] x [0, W-1]`` and
    interpolates inside, exactly like ``scipy.ndimage.map_coordinates(mode="constant")`` used by
    :func:`preprocessing.transforms.warp`; ``"border"`` clamps positions to the edge (used to
    compose displacement fields). Bilinear weights are computed from the fractional part, so
    integer positions return the input values bit for bit. Nearest rounds halves up, as scipy.
    """
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
    if padding not in ("zeros", "border"):
        raise ValueError(f"padding must be 'zeros' or 'border', got {padding!r}")
    batch, channels, height, width = image.shape
    if padding == "border":
        rows = rows.clamp(0, height - 1)
        cols = cols.clamp(0, width - 1)
    inside = (rows >= 0) & (rows <= height - 1) & (cols >= 0) & (cols <= width - 1)
    flat = image.reshape(batch, channels, height * width)

    def gather(r: Tensor, c: Tensor) -> Tensor:
        # NaN positions (a diverged model) must not become wild indices: the NaN still reaches
        # the output through the weights, and the loss check reports it.
        r, c = torch.nan_to_num(r).clamp(0, height - 1), torch.nan_to_num(c).clamp(0, width - 1)
        index = (r * width + c).long()
        index = index.reshape(batch, 1, -1).expand(batch, channels, -1)
        return flat.gather(2, index).reshape(batch, channels, *rows.shape[1:])

    if mode == "nearest":
        out = gather(torch.floor(rows + 0.5), torch.floor(cols + 0.5))
    else:
        r0 = torch.floor(rows).detach()
        c0 = torch.floor(cols).detach()
        wr = (rows - r0).unsqueeze(1)
        wc = (cols - c0).unsqueeze(1)
        # Past the last row/col the far neighbour is clamped back; its weight is 0 there.
        out = ((1 - wr) * ((1 - wc) * gather(r0, c0) + wc * gather(r0, c0 + 1))
               + wr * ((1 - wc) * gather(r0 + 1, c0) + wc * gather(r0 + 1, c0 + 1)))
    if padding == "zeros":
        out = out * inside.unsqueeze(1).to(out.dtype)
    return out


def _identity_grid(height: int, width: int, like: Tensor) -> tuple[Tensor, Tensor]:
    rows = torch.arange(height, dtype=like.dtype, device=like.device)
    cols = torch.arange(width, dtype=like.dtype, device=like.device)
    grid_rows, grid_cols = torch.meshgrid(rows, cols, indexing="ij")
    return grid_rows.unsqueeze(0), grid_cols.unsqueeze(0)


class SpatialTransformer(nn.Module):
    """Warp ``image [B, C, H, W]`` by ``displacement [B, 2, H, W]``: ``out(p) = image(p + u(p))``.

    Displacements are ``(row, col)`` pixels. ``mode="nearest"`` is for label maps (no gradient
    reaches the displacement then). Outside the image the result is 0.
    """

    def __init__(self, mode: str = "bilinear", padding: str = "zeros") -> None:
        super().__init__()
        if mode not in ("bilinear", "nearest"):
            raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
        if padding not in ("zeros", "border"):
            raise ValueError(f"padding must be 'zeros' or 'border', got {padding!r}")
        self.mode = mode
        self.padding = padding

    def forward(self, image: Tensor, displacement: Tensor) -> Tensor:
        if image.dim() != 4 or displacement.dim() != 4 or displacement.shape[1] != 2:
            raise ValueError(f"need image [B, C, H, W] and displacement [B, 2, H, W], got "
                             f"{tuple(image.shape)} and {tuple(displacement.shape)}")
        if image.shape[0] != displacement.shape[0] or image.shape[2:] != displacement.shape[2:]:
            raise ValueError(f"image {tuple(image.shape)} and displacement "
                             f"{tuple(displacement.shape)} differ in batch or size")
        grid_rows, grid_cols = _identity_grid(*image.shape[2:], like=displacement)
        return sample_at(image, grid_rows + displacement[:, 0], grid_cols + displacement[:, 1],
                         mode=self.mode, padding=self.padding)


def integrate_velocity(velocity: Tensor, steps: int, scale: tuple[float, float] = (1.0, 1.0)
                       ) -> Tensor:
    """Scaling and squaring: ``exp(v)`` as ``steps`` self-compositions of ``v / 2**steps``.

    ``velocity`` may live on a coarser grid than the image: ``scale`` is the size of one of its
    cells in image pixels, the unit of the values. Each composition ``u <- u + u(p + u)``
    samples a convex combination of existing values, so ``|u|`` never exceeds ``max |v|``: the
    displacement bound survives integration.
    """
    if steps == 0:
        return velocity
    compose = SpatialTransformer(padding="border")
    divisor = velocity.new_tensor(scale).view(1, 2, 1, 1)
    displacement = velocity / (2 ** steps)
    for _ in range(steps):
        displacement = displacement + compose(displacement, displacement / divisor)
    return displacement


# --------------------------------------------------------------------------------------------
# Network


def _conv(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1),
                         nn.LeakyReLU(0.2))


#: Network inputs: both intensities and both edge-strength maps.
INPUT_CHANNELS = 4
#: Head init scale: the first warps move pixels by a fraction of a pixel, yet the decoder gets
#: gradient from the first step (a near-zero head stalls training for hundreds of iterations).
HEAD_INIT_STD = 1e-2


def soft_clamp(vectors: Tensor, bound: float) -> Tensor:
    """Shrink each ``[B, 2, ...]`` vector to length ``bound * tanh(length / bound)`` < ``bound``.

    Acting on the length (not per component) keeps the direction and makes ``bound`` the true
    maximum magnitude; near zero it is the identity, so small outputs pass unchanged.
    """
    length = torch.sqrt(vectors.pow(2).sum(dim=1, keepdim=True) + 1e-12)
    return vectors * (bound * torch.tanh(length / bound) / length)


class VoxelMorph2D(nn.Module):
    """U-Net on the ``(fixed, moving)`` pair -> bounded displacement -> warped moving slice.

    Inputs are ``[B, 1, H, W]`` tensors in [0, 1]; :meth:`forward` returns
    ``(warped_moving, displacement)`` with the displacement in pixels (pull convention).
    Besides the two intensities the network sees each slice's polarity-free edge strength
    (the NGF gradient magnitude), every channel standardised per slice: with a few hundred
    pairs it then learns to line up edges instead of first having to learn that blood is bright
    in one sequence and dark in the other, which trained several times faster in our tests.
    """

    name = CHECKPOINT_KIND

    def __init__(self, config: VoxelMorphConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = nn.ModuleList()
        widths = [INPUT_CHANNELS]
        for width in config.encoder_channels:
            self.encoder.append(_conv(widths[-1], width, stride=2))
            widths.append(width)
        # Skips from coarse to fine: H/2**(L-1) ... H/2, then the input itself at H; a shorter
        # decoder stops (and predicts the field) before reaching full resolution.
        skips = widths[-2::-1]
        self.decoder = nn.ModuleList()
        current = widths[-1]
        for skip, width in zip(skips, config.decoder_channels, strict=False):
            self.decoder.append(_conv(current + skip, width))
            current = width
        self.head = nn.Conv2d(current, 2, 3, padding=1)
        nn.init.normal_(self.head.weight, std=HEAD_INIT_STD)
        nn.init.zeros_(self.head.bias)
        self.transformer = SpatialTransformer()

    def _inputs(self, fixed: Tensor, moving: Tensor) -> Tensor:
        epsilon = self.config.ngf_epsilon
        x = torch.cat([fixed, moving, edge_strength(fixed, epsilon),
                       edge_strength(moving, epsilon)], dim=1)
        mean = x.mean(dim=(2, 3), keepdim=True)
        std = x.std(dim=(2, 3), keepdim=True).clamp_min(1e-3)  # blank slices stay finite
        return (x - mean) / std

    def displacement(self, fixed: Tensor, moving: Tensor) -> Tensor:
        """The bounded ``[B, 2, H, W]`` displacement for a batch of pairs."""
        if fixed.shape != moving.shape or fixed.dim() != 4 or fixed.shape[1] != 1:
            raise ValueError(f"need fixed and moving as equal [B, 1, H, W], got "
                             f"{tuple(fixed.shape)} and {tuple(moving.shape)}")
        multiple = self.config.size_multiple
        if fixed.shape[2] % multiple or fixed.shape[3] % multiple:
            raise ValueError(f"image size {tuple(fixed.shape[2:])} must be a multiple of "
                             f"{multiple} ({len(self.config.encoder_channels)} encoder levels)")
        features = [self._inputs(fixed, moving)]
        for block in self.encoder:
            features.append(block(features[-1]))
        x = features.pop()
        for block in self.decoder:
            skip = features.pop()
            x = F.interpolate(x, size=skip.shape[2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        velocity = soft_clamp(self.head(x), self.config.max_displacement_px)
        # Integrate on the (possibly coarser) prediction grid, where it is cheap, then upsample.
        # Values are full-grid pixels, so upsampling needs no rescaling, and bilinear weights are
        # convex, so the bound still holds.
        scale = (fixed.shape[2] / velocity.shape[2], fixed.shape[3] / velocity.shape[3])
        displacement = integrate_velocity(velocity, self.config.integration_steps, scale)
        if displacement.shape[2:] != fixed.shape[2:]:
            displacement = F.interpolate(displacement, size=fixed.shape[2:], mode="bilinear",
                                         align_corners=False)
        return displacement

    def forward(self, fixed: Tensor, moving: Tensor) -> tuple[Tensor, Tensor]:
        displacement = self.displacement(fixed, moving)
        return self.transformer(moving, displacement), displacement


# --------------------------------------------------------------------------------------------
# Losses


def _central_gradients(image: Tensor) -> tuple[Tensor, Tensor]:
    """Row and column derivatives (central differences, one-sided at the border) per pixel."""
    padded = F.pad(image, (1, 1, 1, 1), mode="replicate")
    d_row = (padded[:, :, 2:, 1:-1] - padded[:, :, :-2, 1:-1]) / 2
    d_col = (padded[:, :, 1:-1, 2:] - padded[:, :, 1:-1, :-2]) / 2
    return d_row, d_col


def edge_strength(image: Tensor, epsilon: float) -> Tensor:
    """``|g| / sqrt(|g|^2 + eps^2)`` in [0, 1): where NGF sees an edge, whatever its polarity."""
    d_row, d_col = _central_gradients(image)
    squared = d_row * d_row + d_col * d_col
    # Clamped so that a perfectly flat patch has a finite derivative.
    return (squared / (squared + epsilon * epsilon)).clamp_min(1e-12).sqrt()


def ngf_loss(fixed: Tensor, warped: Tensor, epsilon: float, mask: Tensor | None = None) -> Tensor:
    """Normalised-gradient-field distance ``1 - cos^2`` of edge directions, in [0, 1].

    Per pixel ``1 - (g_f . g_w)^2 / ((|g_f|^2 + eps^2)(|g_w|^2 + eps^2))`` with ``g`` the image
    gradients: invariant to contrast scale and polarity, and ``eps`` (intensity units per pixel)
    keeps noise-level gradients from counting as edges (such pixels score ~1 whatever the
    alignment). ``mask`` (broadcastable to ``[B, 1, H, W]``, non-negative) weights the mean.
    """
    if fixed.shape != warped.shape or fixed.dim() != 4:
        raise ValueError(f"need equal [B, C, H, W] images, got {tuple(fixed.shape)} and "
                         f"{tuple(warped.shape)}")
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    fr, fc = _central_gradients(fixed)
    wr, wc = _central_gradients(warped)
    eps2 = epsilon * epsilon
    dot = fr * wr + fc * wc
    distance = 1 - dot * dot / ((fr * fr + fc * fc + eps2) * (wr * wr + wc * wc + eps2))
    if mask is None:
        return distance.mean()
    weights = torch.broadcast_to(mask.to(distance.dtype), distance.shape)
    return (weights * distance).sum() / weights.sum().clamp_min(torch.finfo(distance.dtype).tiny)


def smoothness_loss(displacement: Tensor) -> Tensor:
    """Diffusion energy: mean over pixels of ``||grad u||_F^2`` (forward differences).

    Summed over both displacement components and both directions; a linear ramp ``u_row = a *
    col`` costs exactly ``a**2``, a constant shift costs 0.
    """
    if displacement.dim() != 4 or displacement.shape[1] != 2:
        raise ValueError(f"need displacement [B, 2, H, W], got {tuple(displacement.shape)}")
    d_row = displacement[:, :, 1:, :] - displacement[:, :, :-1, :]
    d_col = displacement[:, :, :, 1:] - displacement[:, :, :, :-1]
    # Mean over batch and pixels, sum over the two components.
    return 2 * (d_row.pow(2).mean() + d_col.pow(2).mean())


def _similarity(name: str):
    # Looked up at call time so that one place maps names to loss functions.
    if name == "ngf":
        return ngf_loss
    raise ValueError(f"unknown similarity {name!r}; known: {SIMILARITIES}")


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
                     checkpoint_path: Path | None = None, progress: bool = True) -> VoxelMorph2D:
    """Fit a :class:`VoxelMorph2D` to ``(fixed, moving, mask)`` slices without ground truth.

    Slices are [0, 255] and share one size (a multiple of ``config.size_multiple``); ``mask`` is
    a fixed-grid weight map (e.g. the dilated myocardium) or None for uniform weights. Batches
    are drawn with a generator seeded from ``config.seed``, optionally under a random flip or
    quarter turn (registration is equivariant to them, and it stretches a few hundred pairs).
    The model returned is in eval mode; with ``checkpoint_path`` its config, weights, optimiser
    and a training summary are written there atomically.

    Cost on CPU: about 3.5-4 s per 100 iterations at 128 x 128, batch 8, with one intra-op
    thread on a shared 2-core machine, where two threads ran 5-10x *slower*; callers on busy
    machines may want ``torch.set_num_threads(1)`` around this call.
    """
    if not isinstance(config, VoxelMorphConfig):
        raise ValueError(f"config must be a VoxelMorphConfig, got {type(config).__name__}")
    device = torch.device(device)
    fixed_all, moving_all, mask_all = (torch.from_numpy(a).to(device)
                                       for a in _stack_pairs(pairs, config.size_multiple))
    similarity = _similarity(config.similarity)
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
                   "training": summary}
        with atomic_path(checkpoint_path) as tmp:
            torch.save(payload, tmp)
    return model


def load_voxelmorph(path: str | Path, device: torch.device | str) -> VoxelMorph2D:
    """Rebuild the model stored by :func:`train_voxelmorph` from the checkpoint alone (eval mode).

    Raises FileNotFoundError for a missing file and ValueError for an unreadable one, a
    checkpoint of another kind, or weights whose names and shapes do not fit the stored config;
    every message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: VoxelMorph checkpoint not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise ValueError(f"{path}: unreadable VoxelMorph checkpoint ({error})") from error
    if not isinstance(payload, dict) or payload.get("kind") != CHECKPOINT_KIND:
        found = payload.get("kind") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path}: not a VoxelMorph checkpoint (kind {found!r}, "
                         f"expected {CHECKPOINT_KIND!r})")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: VoxelMorph checkpoint version {payload.get('version')!r}, "
                         f"this code reads {CHECKPOINT_VERSION}")
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
