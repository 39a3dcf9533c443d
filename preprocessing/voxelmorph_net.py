"""The VoxelMorph-style registration network and its spatial transformer (pieces of step 4).

:func:`sample_at` and :class:`SpatialTransformer` warp ``[B, C, H, W]`` images by a
``(row, col)`` pixel displacement in the pull convention of :mod:`preprocessing.transforms`
(``out(p) = image(p + u(p))``, zero outside), so a trained field means the same here and there.
:class:`VoxelMorph2D` is the small U-Net that predicts that displacement for a
``(fixed, moving)`` pair.

Each displacement vector is soft-clamped to a length ``m * tanh(|raw| / m)`` below
``m = max_displacement_px``: a poorly trained model can only move pixels a few millimetres, never
fold the slice wholesale. With ``integration_steps > 0`` the output is a stationary velocity
integrated by scaling and squaring (:func:`integrate_velocity`), which gives a diffeomorphic
(fold-free up to discretisation) map under the same bound. :class:`VoxelMorphConfig` (network,
loss and training settings) lives here with the network it builds; training, checkpoints and
prediction in :mod:`preprocessing.voxelmorph`; the losses in :mod:`preprocessing.voxelmorph_losses`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from preprocessing.voxelmorph_losses import SIMILARITIES, edge_strength
from utils import check_int, from_mapping, require_finite_fields

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
                check_int(f"{name}[{i}]", width, minimum=1)
        if len(self.decoder_channels) > len(self.encoder_channels):
            raise ValueError("decoder_channels needs at most one entry per encoder level: got "
                             f"{self.decoder_channels} for {self.encoder_channels}")
        require_finite_fields(self, "max_displacement_px", "ngf_epsilon", "learning_rate",
                              positive=True)
        require_finite_fields(self, "smoothness_weight")
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"unknown similarity {self.similarity!r}; known: {SIMILARITIES}")
        check_int("integration_steps", self.integration_steps, minimum=0)
        if self.integration_steps > MAX_INTEGRATION_STEPS:
            raise ValueError(f"integration_steps must be <= {MAX_INTEGRATION_STEPS}, "
                             f"got {self.integration_steps}")
        check_int("iterations", self.iterations, minimum=1)
        check_int("batch_size", self.batch_size, minimum=1)
        check_int("seed", self.seed, minimum=0)
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
        return from_mapping(cls, values)


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

    #: Also the ``kind`` of its checkpoints (:data:`preprocessing.voxelmorph.CHECKPOINT_KIND`).
    name = "voxelmorph2d"

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
