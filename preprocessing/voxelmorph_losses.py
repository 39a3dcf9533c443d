"""Training losses of the VoxelMorph step: NGF similarity and diffusion smoothness.

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
segment. :func:`edge_strength`, the polarity-free gradient magnitude NGF sees, is also an input
channel of :class:`preprocessing.voxelmorph_net.VoxelMorph2D`.

Kept apart from the network so that the objective can be read, tested and changed on its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: Names accepted by ``VoxelMorphConfig.similarity``.
SIMILARITIES = ("ngf",)


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


def similarity_loss(name: str):
    """The similarity loss function called ``name`` (one of :data:`SIMILARITIES`)."""
    # Looked up at call time so that one place maps names to loss functions.
    if name == "ngf":
        return ngf_loss
    raise ValueError(f"unknown similarity {name!r}; known: {SIMILARITIES}")
