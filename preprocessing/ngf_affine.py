"""Step 3, edge-based: slice-wise 2D affine fit on normalised gradient fields (NGF).

Mutual information compares intensity histograms, which the three sequences fill very
differently inside the heart: scar is bright in LGE and invisible in bSSFP, the blood pool is
bright in bSSFP and dark in dark-blood T2w. On real MyoPS slices that lets MI trade a few
millimetres of edge alignment for a better histogram match. NGF compares only the *direction* of
the intensity gradients, squared so that a bright-to-dark edge matches a dark-to-bright one: the
endo- and epicardial borders, which every sequence shows, drive the fit whatever the contrast.

The NGF landscape between sequences is flat and bumpy, so the fit first searches whole-pixel
shifts exhaustively on a smoothed pair (the global optimum does not depend on where the slice
started), then refines the full model by L-BFGS over a short Gaussian pyramid. Everything is
restricted to the heart's neighbourhood (the myocardial metric mask), and a weak Gaussian prior
pulls the parameters to identity so that a slice with weak edges stays put instead of drifting.
All slices of a sequence are fitted as one batch in torch.

Results are :class:`~preprocessing.affine_registration.AffineResult` like the MI fit's. The
metric is the mean squared NGF cosine, reported negated so that lower is better as with
SimpleITK's metrics. A fit that does not beat identity by ``min_gain``, or is implausible, falls
back to identity.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from preprocessing.affine_registration import (
    AffineRegistrationConfig,
    AffineResult,
    check_pyramid,
    check_slice_inputs,
    implausibility,
)
from preprocessing.transforms import Affine2D
from utils import ConfigRecord, require_finite_fields

NGF_MODELS: tuple[str, ...] = ("affine", "similarity", "rigid")


@dataclass(frozen=True)
class NGFAffineConfig(ConfigRecord):
    """Settings of the NGF fit (defaults suit 1 mm slices in [0, 255]).

    ``prior_mm`` is the expected size of a breath-hold misalignment: a parameter moving the heart
    by that much costs as much as a ``prior_weight`` drop of the NGF score.
    """

    model: str = "affine"
    search_mm: float = 8.0  # exhaustive translation search over +-search_mm ...
    search_step_mm: float = 1.0  # ... in steps of this size, before the local fit
    search_sigma_mm: float = 2.0
    smoothing_sigmas_mm: tuple[float, ...] = (1.5, 0.75)
    iterations: tuple[int, ...] = (25, 15)  # L-BFGS iterations per level
    edge_fraction: float = 0.3  # NGF epsilon as a fraction of the median gradient magnitude
    prior_mm: float = 4.0
    prior_weight: float = 0.02
    min_gain: float = 0.005  # NGF score the fit must gain over identity to be kept
    pad_mm: float = 10.0  # crop margin around the mask

    def __post_init__(self) -> None:
        if self.model not in NGF_MODELS:
            raise ValueError(f"model must be one of {NGF_MODELS}, got {self.model!r}")
        check_pyramid(self.smoothing_sigmas_mm, self.iterations, zero_sigma=True)
        require_finite_fields(self, "edge_fraction", "prior_mm", "pad_mm", "search_step_mm",
                              "search_sigma_mm", positive=True)
        require_finite_fields(self, "prior_weight", "min_gain", "search_mm")



def register_affine_ngf(fixed: Sequence[np.ndarray] | np.ndarray,
                        moving: Sequence[np.ndarray] | np.ndarray,
                        masks: Sequence[np.ndarray] | np.ndarray,
                        config: NGFAffineConfig | None = None,
                        bounds: AffineRegistrationConfig | None = None,
                        ) -> list[AffineResult]:
    """Fit every slice pair ``fixed[i] (row, col) -> moving[i] (row, col)`` on its mask.

    Arrays are ``[N, H, W]`` on one 1 mm grid (``bounds.pixel_spacing_mm``); ``bounds`` supplies
    the plausibility limits shared with the MI fit. Never raises for hard images: a slice with an
    empty mask or no edges, or a fit that does not pay, comes back as the identity with the reason.
    """
    start = time.perf_counter()
    config = config or NGFAffineConfig()
    bounds = bounds or AffineRegistrationConfig()
    fixed_np, moving_np, masks_np = check_slice_inputs(fixed, moving, masks, stacked=True,
                                                    mask_name="masks")
    count = len(fixed_np)
    spacing = bounds.pixel_spacing_mm
    usable = [int(m.sum()) >= bounds.min_mask_pixels for m in masks_np]
    centres, radii = mask_geometry(masks_np, spacing)
    window = _window(masks_np, config.pad_mm / spacing)
    weights = torch.from_numpy(np.stack([ndimage.gaussian_filter(m.astype(np.float32), 1.0)
                                         for m in masks_np]))[:, window[0], window[1]]
    centre_t = torch.from_numpy(centres).float()
    radius_t = torch.from_numpy(radii).float()
    theta = torch.zeros(count, model_dof(config.model), dtype=torch.float32)
    theta[:, -2:] = _translation_search(fixed_np, moving_np, masks_np, weights, window, config,
                                        spacing)
    theta.requires_grad_(True)
    for level, sigma in enumerate(config.smoothing_sigmas_mm):
        fixed_n, moving_n = _level_inputs(fixed_np, moving_np, masks_np, sigma / spacing,
                                          config, window)
        _fit_level(theta, fixed_n, moving_n, weights, window, centre_t, radius_t, config,
                   config.iterations[level], spacing)

    # Scored on the finest level, whose inputs the loop left in fixed_n, moving_n.
    with torch.no_grad():
        eye = torch.zeros_like(theta)
        before = _ngf_score(fixed_n, moving_n,
                            *params_to_affine(eye, config.model, centre_t, radius_t),
                            weights, window)
        matrix, offset = params_to_affine(theta, config.model, centre_t, radius_t)
        after = _ngf_score(fixed_n, moving_n, matrix, offset, weights, window)
    seconds = (time.perf_counter() - start) / max(count, 1)
    results = []
    for i in range(count):
        transform = Affine2D(matrix[i].double().numpy(), offset[i].double().numpy())
        gain = float(after[i] - before[i])
        reason = None
        if not usable[i]:
            reason = f"fixed mask has {int(masks_np[i].sum())} < {bounds.min_mask_pixels} pixels"
        elif not math.isfinite(gain):
            reason = "NGF score undefined (no edges)"
        else:
            reason = implausibility(transform, centres[i], bounds)
            if reason is None and gain < config.min_gain:
                reason = f"NGF gain {gain:.4f} below {config.min_gain}"
        if reason is not None:
            results.append(AffineResult(Affine2D.identity(), "identity", -float(before[i]),
                                        -float(before[i]), seconds, config.model,
                                        (f"{config.model}: {reason}",)))
        else:
            results.append(AffineResult(transform, config.model, -float(before[i]),
                                        -float(after[i]), seconds, config.model))
    return results


def _fit_level(theta: torch.Tensor, fixed_n: torch.Tensor, moving_n: torch.Tensor,
               weights: torch.Tensor, window: tuple[slice, slice], centre: torch.Tensor,
               radius: torch.Tensor, config: NGFAffineConfig, iterations: int,
               spacing: float) -> None:
    """Refine ``theta`` in place by L-BFGS on one pyramid level.

    The slices' losses are summed but independent, so one quasi-Newton run fits them all; a
    line search suits this smooth, low-dimensional problem better than fixed steps.
    """
    optimiser = torch.optim.LBFGS([theta], lr=1.0, max_iter=iterations, history_size=20,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-7,
                                  tolerance_change=1e-9)

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        matrix, offset = params_to_affine(theta, config.model, centre, radius)
        score = _ngf_score(fixed_n, moving_n, matrix, offset, weights, window)
        prior = (theta / (config.prior_mm / spacing)).pow(2).sum(dim=1)
        loss = (-score + config.prior_weight * prior).sum()
        loss.backward()
        return loss

    optimiser.step(closure)


def _translation_search(fixed: np.ndarray, moving: np.ndarray, masks: np.ndarray,
                        weights: torch.Tensor, window: tuple[slice, slice],
                        config: NGFAffineConfig, spacing: float) -> torch.Tensor:
    """Best whole-pixel-grid shift ``[N, 2]`` (pixels) of each slice by exhaustive search.

    The NGF landscape between sequences is flat and bumpy, so a gradient descent from identity
    stops in whichever bump is nearest; the global maximum over shifts, found by brute force on
    a smoothed pair, lands in the same place whatever the starting misalignment. The prior is
    applied here too, so a distant spurious peak must clearly beat a near one.
    """
    steps = np.arange(-config.search_mm, config.search_mm + 1e-9, config.search_step_mm)
    steps = torch.from_numpy(steps / spacing).float()
    shifts = torch.cartesian_prod(steps, steps)  # [K, 2]
    fixed_n, moving_n = _level_inputs(fixed, moving, masks, config.search_sigma_mm / spacing,
                                      config, window)
    prior = config.prior_weight * (shifts / (config.prior_mm / spacing)).pow(2).sum(dim=1)
    best = torch.zeros(len(fixed), 2)
    eye = torch.eye(2).expand(len(shifts), 2, 2)
    with torch.no_grad():
        for i in range(len(fixed)):
            score = _ngf_score(fixed_n[i:i + 1].expand(len(shifts), -1, -1, -1),
                               moving_n[i:i + 1].expand(len(shifts), -1, -1, -1), eye, shifts,
                               weights[i:i + 1].expand(len(shifts), -1, -1), window)
            best[i] = shifts[int(torch.argmax(score - prior))]
    return best


def model_dof(model: str) -> int:
    """Parameters of a transform model (see :func:`params_to_affine`)."""
    return {"affine": 6, "similarity": 4, "rigid": 3}[model]


def mask_geometry(masks: np.ndarray, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Centre ``(row, col)`` and RMS radius (pixels) of each mask; image centre when empty."""
    centres, radii = [], []
    for mask in masks:
        points = np.argwhere(mask)
        if len(points) == 0:
            centres.append((np.array(mask.shape) - 1) / 2)
            radii.append(max(mask.shape) / 4)
            continue
        centre = points.mean(axis=0)
        centres.append(centre)
        radii.append(max(float(np.sqrt(((points - centre) ** 2).sum(axis=1).mean())),
                         1.0 / spacing))
    return np.asarray(centres, dtype=np.float64), np.asarray(radii, dtype=np.float64)


def params_to_affine(theta: torch.Tensor, model: str, centre: torch.Tensor,
                     radius: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Parameters (all in pixels of heart motion) -> ``p_moving = M p + offset`` per slice.

    Matrix terms are scaled by the heart radius so that a unit step of any parameter moves the
    heart rim by about one pixel: one learning rate then suits translation and deformation.
    """
    r = radius[:, None]
    if model == "affine":
        matrix = torch.eye(2, dtype=theta.dtype) + (theta[:, :4] / r).view(-1, 2, 2)
        shift = theta[:, 4:]
    else:
        angle = theta[:, 0] / radius
        scale = torch.exp(theta[:, 1] / radius) if model == "similarity" else torch.ones_like(
            angle)
        cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
        matrix = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
        shift = theta[:, -2:]
    offset = centre + shift - torch.einsum("nij,nj->ni", matrix, centre)
    return matrix, offset


def sampling_grid(matrix: torch.Tensor, offset: torch.Tensor, shape: tuple[int, int],
                  window: tuple[slice, slice]) -> torch.Tensor:
    """``grid_sample`` grid ``[N, h, w, 2]`` of the moving positions ``M p + offset`` of the fixed
    pixels ``p`` in ``window``, for moving images of ``shape`` (``align_corners=True``)."""
    count = matrix.shape[0]
    height, width = shape
    row_range, col_range = range(height)[window[0]], range(width)[window[1]]
    rows, cols = torch.meshgrid(
        torch.arange(row_range.start, row_range.stop, dtype=matrix.dtype),
        torch.arange(col_range.start, col_range.stop, dtype=matrix.dtype), indexing="ij")
    points = torch.stack([rows, cols], dim=-1).view(1, -1, 2)
    mapped = torch.einsum("nij,npj->npi", matrix, points.expand(count, -1, -1))
    mapped = mapped + offset[:, None, :]
    grid = torch.stack([mapped[..., 1] / (width - 1), mapped[..., 0] / (height - 1)], dim=-1)
    return (2 * grid - 1).view(count, len(row_range), len(col_range), 2)


def _gradients(images: torch.Tensor) -> torch.Tensor:
    """Central differences ``[N, 2, H, W]`` (d/drow, d/dcol), replicate-padded borders."""
    padded = F.pad(images[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
    d_row = (padded[:, 2:, 1:-1] - padded[:, :-2, 1:-1]) / 2
    d_col = (padded[:, 1:-1, 2:] - padded[:, 1:-1, :-2]) / 2
    return torch.stack([d_row, d_col], dim=1)


def _window(masks: np.ndarray, pad_px: float) -> tuple[slice, slice]:
    """Bounding box of all masks plus ``pad_px``: the only pixels the metric looks at."""
    union = masks.any(axis=0)
    if not union.any():
        return slice(None), slice(None)
    rows, cols = np.nonzero(union)
    pad = math.ceil(pad_px)
    return (slice(max(0, rows.min() - pad), min(union.shape[0], rows.max() + pad + 1)),
            slice(max(0, cols.min() - pad), min(union.shape[1], cols.max() + pad + 1)))


def _level_inputs(fixed: np.ndarray, moving: np.ndarray, masks: np.ndarray, sigma_px: float,
                  config: NGFAffineConfig, window: tuple[slice, slice]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised gradient fields of the smoothed slices: fixed ``[N, 2, h, w]`` on ``window``,
    moving ``[N, 3, H, W]`` whole (it is sampled wherever the transform maps; channel 2 holds
    the vectors' lengths, see :func:`_ngf_score`).

    Epsilon (the gradient size below which an edge counts as noise) is ``edge_fraction`` of each
    slice's median gradient magnitude inside the mask.
    """
    def normals(stack: np.ndarray, region: tuple[slice, slice]) -> torch.Tensor:
        stack = stack.astype(np.float32)
        if sigma_px > 0:
            stack = np.stack([ndimage.gaussian_filter(s, sigma_px) for s in stack])
        grad = _gradients(torch.from_numpy(stack))
        magnitude = grad[:, :, region[0], region[1]].norm(dim=1)
        mask_t = torch.from_numpy(masks[:, region[0], region[1]])
        eps = torch.stack([
            config.edge_fraction * (m[k] if k.any() else m.flatten()).median().clamp_min(1e-6)
            for m, k in zip(magnitude, mask_t, strict=True)])
        return grad / (grad.pow(2).sum(dim=1, keepdim=True) + eps[:, None, None, None] ** 2).sqrt()

    fixed_n = normals(fixed, window)[:, :, window[0], window[1]]
    moving_n = normals(moving, window)
    return fixed_n, torch.cat([moving_n, moving_n.norm(dim=1, keepdim=True)], dim=1)


def _ngf_score(fixed_n: torch.Tensor, moving_n: torch.Tensor, matrix: torch.Tensor,
               offset: torch.Tensor, weights: torch.Tensor,
               window: tuple[slice, slice]) -> torch.Tensor:
    """Weighted mean squared cosine between fixed and transformed moving edges, per slice.

    The moving image's gradient at ``A p + b``, pulled back to the fixed grid, is ``A^T`` times
    it. Interpolating a field of unit vectors shortens them between pixels (neighbours point
    in slightly different directions), which would make every whole-pixel shift a spurious
    local optimum; so the interpolated vectors give only the *direction*, and the edge strength
    comes from the interpolated magnitudes, which interpolation does not bias.
    """
    grid = sampling_grid(matrix, offset, tuple(moving_n.shape[-2:]), window)
    warped = F.grid_sample(moving_n, grid, mode="bilinear", padding_mode="border",
                           align_corners=True)
    pulled = torch.einsum("nji,njhw->nihw", matrix, warped[:, :2])
    direction = pulled / (pulled.pow(2).sum(dim=1, keepdim=True) + 1e-12).sqrt()
    cosine2 = (fixed_n * direction).sum(dim=1).pow(2) * warped[:, 2]
    w = weights.to(cosine2.dtype)
    return (w * cosine2).sum(dim=(1, 2)) / w.sum(dim=(1, 2)).clamp_min(1e-12)
