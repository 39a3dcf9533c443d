"""Step 3: slice-wise 2D affine registration of bSSFP / T2w onto the LGE slice, guided by the heart.

Breath-hold differences leave each sequence's slice rotated, shifted and scaled by a few degrees,
millimetres and per cent relative to LGE. The fit is driven by the LGE myocardium dilated by a
margin (the metric's fixed mask), so the chest wall and liver, which move differently, do not pull
it. The sequences differ in contrast (bright / grey / dark blood), so the metric is Mattes mutual
information, evaluated on every mask pixel with one ITK thread so that a run is repeatable.
The transform starts at identity pivoting on the mask centre: the expected misalignment is a few
millimetres, while centre-of-intensity starts differ between contrasts by more than that.

The result is an :class:`~preprocessing.transforms.Affine2D` in the project's pull convention
(fixed LGE grid ``(row, col)`` -> moving grid ``(row, col)``, pixels). A fit that makes the metric
worse than identity, or lands outside the plausibility bounds, falls back to a model with fewer
degrees of freedom (affine -> similarity -> rigid -> identity), and the result says why.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from preprocessing.transforms import Affine2D
from utils import ConfigRecord, require_finite, require_finite_fields

MODELS: tuple[str, ...] = ("affine", "similarity", "rigid")
#: Swaps (row, col) <-> (x, y); SimpleITK indexes a ``GetImageFromArray([H, W])`` image as x=col.
_SWAP = np.array([[0.0, 1.0], [1.0, 0.0]])


def _check_sigmas(sigmas_mm: Sequence[float], *, positive: bool) -> None:
    """Every pyramid level's smoothing sigma finite and >= 0 (> 0 with ``positive``), named by
    its index."""
    require_finite(positive=positive,
                   **{f"smoothing_sigmas_mm[{k}]": s for k, s in enumerate(sigmas_mm)})


@dataclass(frozen=True)
class AffineRegistrationConfig(ConfigRecord):
    """Settings of the mask-guided affine fit (defaults suit 1 mm, 224 px, [0, 255] slices).

    The plausibility bounds sit about 1.5x beyond the expected breath-hold misalignment (5 deg,
    4 mm, 4 %); stretches outside ``scale_bounds`` also catch shear and anisotropy.
    """

    model: str = "affine"
    mask_margin_mm: float = 15.0
    histogram_bins: int = 32
    shrink_factors: tuple[int, ...] = (4, 2, 1)
    smoothing_sigmas_mm: tuple[float, ...] = (2.0, 1.0, 0.0)
    iterations: int = 40  # per resolution level
    learning_rate: float = 1.0  # first step of each level, mm of heart motion
    min_step: float = 1e-3  # mm; the level stops below it
    relaxation: float = 0.7  # step shrink factor when the gradient turns back
    sampling_fraction: float = 1.0  # 1.0: every mask pixel; below: random, seeded by ``seed``
    seed: int = 0
    num_threads: int = 1  # ITK threads; 1 keeps runs bit-identical
    max_rotation_deg: float = 8.0
    max_translation_mm: float = 6.0  # displacement of the mask centre
    scale_bounds: tuple[float, float] = (0.93, 1.07)
    min_mask_pixels: int = 64
    pixel_spacing_mm: float = 1.0

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        require_finite_fields(self, "mask_margin_mm")
        if self.histogram_bins < 4:
            raise ValueError(f"histogram_bins must be >= 4, got {self.histogram_bins}")
        if not self.shrink_factors or len(self.shrink_factors) != len(self.smoothing_sigmas_mm):
            raise ValueError("shrink_factors and smoothing_sigmas_mm need the same, non-zero "
                             f"length, got {self.shrink_factors}, {self.smoothing_sigmas_mm}")
        if any(int(f) != f or f < 1 for f in self.shrink_factors):
            raise ValueError(f"shrink_factors must be integers >= 1, got {self.shrink_factors}")
        _check_sigmas(self.smoothing_sigmas_mm, positive=False)
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        if not 0 < self.min_step < self.learning_rate:
            raise ValueError(f"need 0 < min_step < learning_rate, got {self.min_step}, "
                             f"{self.learning_rate}")
        if not 0 < self.relaxation < 1:
            raise ValueError(f"relaxation must lie in (0, 1), got {self.relaxation}")
        if not 0 < self.sampling_fraction <= 1:
            raise ValueError(f"sampling_fraction must lie in (0, 1], got {self.sampling_fraction}")
        if self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        if not 0 < self.max_rotation_deg <= 180:
            raise ValueError(f"max_rotation_deg must lie in (0, 180], got {self.max_rotation_deg}")
        if not self.max_translation_mm > 0:
            raise ValueError(f"max_translation_mm must be > 0, got {self.max_translation_mm}")
        low, high = self.scale_bounds
        if not 0 < low <= 1 <= high:
            raise ValueError(f"scale_bounds must satisfy 0 < low <= 1 <= high, got "
                             f"{self.scale_bounds}")
        if self.min_mask_pixels < 1:
            raise ValueError(f"min_mask_pixels must be >= 1, got {self.min_mask_pixels}")
        require_finite_fields(self, "pixel_spacing_mm", positive=True)



@dataclass(frozen=True)
class AffineResult:
    """The transform finally used and the evidence for it (for the per-case manifest).

    Metric values are SimpleITK's Mattes value, the *negative* mutual information inside the mask
    at full resolution: lower is better. ``fallbacks`` lists each rejected model with its reason.
    """

    transform: Affine2D
    model: str
    metric_before: float
    metric_after: float
    seconds: float
    requested_model: str = "affine"
    fallbacks: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {
            "transform": self.transform.to_dict(),
            "model": self.model,
            "requested_model": self.requested_model,
            "metric_before": _json_float(self.metric_before),
            "metric_after": _json_float(self.metric_after),
            "seconds": self.seconds,
            "fallbacks": list(self.fallbacks),
        }


def myocardium_metric_mask(label: np.ndarray, margin_mm: float,
                           pixel_spacing_mm: float = 1.0) -> np.ndarray:
    """Myocardium (labels > 0) with its cavity filled, dilated by ``margin_mm``: the metric mask.

    The filled cavity and the margin keep the blood/myocardium and epicardial edges, which carry
    the alignment, inside the mask; everything farther away (chest wall, liver) is left out.
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label must be a 2D [H, W] slice, got shape {label.shape}")
    if not (margin_mm >= 0 and math.isfinite(margin_mm)) or not pixel_spacing_mm > 0:
        raise ValueError(f"need margin_mm >= 0 and pixel_spacing_mm > 0, got {margin_mm}, "
                         f"{pixel_spacing_mm}")
    heart = ndimage.binary_fill_holes(label > 0)
    if not heart.any():
        return heart
    distance = ndimage.distance_transform_edt(~heart, sampling=pixel_spacing_mm)
    return distance <= margin_mm


def register_affine(fixed: np.ndarray, moving: np.ndarray, fixed_mask: np.ndarray,
                    config: AffineRegistrationConfig = AffineRegistrationConfig()) -> AffineResult:
    """Fit ``fixed (row, col) -> moving (row, col)`` on the masked heart, with fallbacks.

    ``fixed`` and ``moving`` are ``[H, W]`` slices on the same grid (``config.pixel_spacing_mm``);
    ``fixed_mask`` is the boolean metric mask on the fixed grid (see
    :func:`myocardium_metric_mask`). Never raises for hard images: a fit that cannot be trusted
    comes back as a simpler model or the identity, with the reasons in ``fallbacks``. An empty
    (or tiny) mask or a constant image gives the identity with NaN metrics.
    """
    start = time.perf_counter()
    fixed, moving, fixed_mask = check_slice_inputs(fixed, moving, fixed_mask)
    transform, model, before, after, reasons = _fit(fixed, moving, fixed_mask, config)
    return AffineResult(transform, model, before, after, time.perf_counter() - start,
                        config.model, tuple(reasons))


def _fit(fixed: np.ndarray, moving: np.ndarray, fixed_mask: np.ndarray,
         config: AffineRegistrationConfig) -> tuple[Affine2D, str, float, float, list[str]]:
    """Try the requested model, then simpler ones; ``(transform, model, before, after, why)``."""
    reasons: list[str] = []
    if fixed_mask.sum() < config.min_mask_pixels:
        reasons.append(f"fixed mask has {int(fixed_mask.sum())} < {config.min_mask_pixels} pixels")
        return Affine2D.identity(), "identity", math.nan, math.nan, reasons
    for name, values in (("fixed", fixed[fixed_mask]), ("moving", moving)):
        if np.ptp(values) <= 1e-6 * max(1.0, float(np.abs(values).max())):
            reasons.append(f"{name} image is constant where it is used")
            return Affine2D.identity(), "identity", math.nan, math.nan, reasons

    # SimpleITK's gradient descent takes steps of one length in raw parameter space, so a step
    # sized for the offset is a huge one for the matrix. Measuring positions in units of the
    # heart's radius makes a unit change of every parameter move the heart by about the same.
    points_rc = np.argwhere(fixed_mask)
    centre_rc = points_rc.mean(axis=0)
    offsets_mm = (points_rc - centre_rc) * config.pixel_spacing_mm
    unit_mm = max(float(np.sqrt((offsets_mm**2).sum(axis=1).mean())), config.pixel_spacing_mm)
    spacing = config.pixel_spacing_mm / unit_mm  # grid pixel size in heart radii
    # Only the mask's neighbourhood of the fixed slice is sampled: crop it (with room for the
    # pyramid's smoothing) and keep its physical position, so the transform is unaffected.
    window = _crop_window(fixed_mask, config)
    origin = (window[0].start, window[1].start)
    fixed_image = _to_sitk(fixed[window], spacing, origin)
    mask_image = _to_sitk(fixed_mask[window].astype(np.uint8), spacing, origin)
    moving_image = _to_sitk(moving, spacing)
    # Rotation and scale pivot on the heart, so they do not trade off against translation.
    centre_xy = tuple(float(v) for v in _SWAP @ centre_rc * spacing)
    heart_spread = ((offsets_mm[:, ::-1] / unit_mm) ** 2).mean(axis=0)

    with _itk_threads(config.num_threads):
        try:
            before = _metric_value(fixed_image, moving_image, mask_image,
                                   sitk.Euler2DTransform(), config)
        except RuntimeError as error:
            reasons.append(f"metric undefined at identity: {_error_summary(error)}")
            return Affine2D.identity(), "identity", math.nan, math.nan, reasons
        for model in MODELS[MODELS.index(config.model):]:
            transform = _model_transform(model, centre_xy)
            try:
                method = _registration(mask_image, transform, heart_spread, unit_mm, config)
                method.Execute(fixed_image, moving_image)
                after = _metric_value(fixed_image, moving_image, mask_image, transform, config)
            except RuntimeError as error:
                reasons.append(f"{model}: registration failed: {_error_summary(error)}")
                continue
            affine = sitk_to_affine(transform, spacing)
            problem = implausibility(affine, centre_rc, config)
            if problem is None and not after <= before:
                problem = f"metric {after:.4f} worse than identity {before:.4f}"
            if problem is None:
                return affine, model, before, after, reasons
            reasons.append(f"{model}: {problem}")
    return Affine2D.identity(), "identity", before, before, reasons


def implausibility(transform: Affine2D, centre_rc: np.ndarray,
                   config: AffineRegistrationConfig) -> str | None:
    """Why ``transform`` is not a plausible breath-hold misalignment, or None if it is.

    The matrix is split into rotation and stretch (polar decomposition); the stretches bound scale,
    anisotropy and shear together. Translation is the displacement of the heart centre, which does
    not depend on where the rotation pivots.
    """
    left, stretches, right = np.linalg.svd(transform.matrix)
    rotation = left @ right
    if np.linalg.det(rotation) < 0:
        return "transform mirrors the image"
    angle = math.degrees(math.atan2(rotation[1, 0], rotation[0, 0]))
    if abs(angle) > config.max_rotation_deg:
        return f"rotation {angle:.1f} deg beyond {config.max_rotation_deg}"
    low, high = config.scale_bounds
    if stretches.min() < low or stretches.max() > high:
        return f"scales {np.round(stretches, 3).tolist()} outside {config.scale_bounds}"
    shift_mm = float(np.linalg.norm(transform.apply(centre_rc) - centre_rc))
    shift_mm *= config.pixel_spacing_mm
    if shift_mm > config.max_translation_mm:
        return f"heart shift {shift_mm:.1f} mm beyond {config.max_translation_mm}"
    return None


def sitk_to_affine(transform: sitk.Transform, pixel_spacing_mm: float = 1.0) -> Affine2D:
    """A SimpleITK 2D matrix-offset transform (fixed -> moving physical x, y) as a grid Affine2D.

    SimpleITK maps ``p -> A (p - c) + c + t`` with ``p = (x, y) = (col, row) * spacing`` (zero
    origin, identity direction, as ``GetImageFromArray`` gives); swapping the axes and dividing
    by the spacing gives ``(row, col) -> (P A P) (row, col) + P (c + t - A c) / spacing``.
    """
    matrix = np.asarray(transform.GetMatrix(), dtype=np.float64).reshape(2, 2)
    translation = np.asarray(transform.GetTranslation(), dtype=np.float64)
    centre = np.asarray(transform.GetCenter(), dtype=np.float64)
    offset_xy = centre + translation - matrix @ centre
    return Affine2D(_SWAP @ matrix @ _SWAP, _SWAP @ offset_xy / pixel_spacing_mm)


def affine_to_sitk(transform: Affine2D, pixel_spacing_mm: float = 1.0) -> sitk.AffineTransform:
    """The inverse of :func:`sitk_to_affine`: a grid Affine2D as a SimpleITK AffineTransform."""
    result = sitk.AffineTransform(2)
    result.SetMatrix((_SWAP @ transform.matrix @ _SWAP).ravel().tolist())
    result.SetTranslation((_SWAP @ transform.offset * pixel_spacing_mm).tolist())
    return result


def check_pyramid(sigmas_mm: Sequence[float], iterations: Sequence[int], *,
                  zero_sigma: bool) -> None:
    """Check a fit's pyramid: one smoothing sigma (mm; 0 = unsmoothed where ``zero_sigma``) and
    one iteration count >= 1 per level."""
    if not sigmas_mm or len(iterations) != len(sigmas_mm):
        raise ValueError("smoothing_sigmas_mm and iterations need one entry per pyramid level, "
                         f"got {tuple(sigmas_mm)} and {tuple(iterations)}")
    _check_sigmas(sigmas_mm, positive=not zero_sigma)
    if any(isinstance(n, bool) or int(n) != n or n < 1 for n in iterations):
        raise ValueError(f"iterations must be ints >= 1, got {tuple(iterations)}")


def check_slice_inputs(fixed: np.ndarray, moving: np.ndarray, masks: np.ndarray, *,
                       stacked: bool = False, mask_name: str = "fixed_mask"
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate a fixed/moving/mask triple of ``[H, W]`` slices (``[N, H, W]`` if ``stacked``).

    Shared by the MI fit (one slice) and the NGF fit (a stack); returns float32 images.
    """
    fixed = np.asarray(fixed, dtype=np.float32)
    moving = np.asarray(moving, dtype=np.float32)
    masks = np.asarray(masks)
    ndim, layout = (3, "[N, H, W]") if stacked else (2, "[H, W]")
    if fixed.ndim != ndim or fixed.shape != moving.shape or fixed.shape != masks.shape:
        raise ValueError(f"fixed, moving and {mask_name} must be {layout} on one grid, got "
                         f"{fixed.shape}, {moving.shape}, {masks.shape}")
    if min(fixed.shape[-2:]) < 8:
        raise ValueError(f"slices must be at least 8 x 8 pixels, got {fixed.shape[-2:]}")
    if masks.dtype != bool:
        raise ValueError(f"{mask_name} must be boolean, got {masks.dtype}")
    if not (np.isfinite(fixed).all() and np.isfinite(moving).all()):
        raise ValueError("fixed and moving must be finite")
    return fixed, moving, masks


@contextmanager
def _itk_threads(count: int) -> Iterator[None]:
    """Run ITK with ``count`` threads, then restore the previous global setting.

    ITK's threaded metric sums partial results in whatever order the threads finish, which
    changes the optimiser's path in the last digits; one thread makes every run repeatable.
    """
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(count)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)


def _crop_window(mask: np.ndarray, config: AffineRegistrationConfig) -> tuple[slice, slice]:
    """Bounding box of ``mask`` padded by the pyramid's smoothing reach and coarsest pixel."""
    pad = math.ceil(3 * max(config.smoothing_sigmas_mm) / config.pixel_spacing_mm)
    pad += 2 * max(config.shrink_factors)
    rows, cols = np.nonzero(mask)
    return (slice(max(0, rows.min() - pad), min(mask.shape[0], rows.max() + pad + 1)),
            slice(max(0, cols.min() - pad), min(mask.shape[1], cols.max() + pad + 1)))


def _to_sitk(array: np.ndarray, spacing: float,
             origin_rc: tuple[int, int] = (0, 0)) -> sitk.Image:
    """``[H, W]`` array as an image with x = col, y = row, and pixel ``origin_rc`` of the grid."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing((spacing, spacing))
    image.SetOrigin((float(origin_rc[1] * spacing), float(origin_rc[0] * spacing)))
    return image


def _model_transform(model: str, centre_xy: tuple[float, float]) -> sitk.Transform:
    """Identity of ``model`` pivoting on the heart centre (see the module docstring)."""
    transform = {"affine": lambda: sitk.AffineTransform(2),
                 "similarity": sitk.Similarity2DTransform,
                 "rigid": sitk.Euler2DTransform}[model]()
    transform.SetCenter(centre_xy)
    return transform


def _base_method(mask_image: sitk.Image, config: AffineRegistrationConfig
                 ) -> sitk.ImageRegistrationMethod:
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=config.histogram_bins)
    if config.sampling_fraction >= 1:
        method.SetMetricSamplingStrategy(method.NONE)
    else:
        method.SetMetricSamplingStrategy(method.RANDOM)
        method.SetMetricSamplingPercentage(config.sampling_fraction, config.seed)
    method.SetMetricFixedMask(mask_image)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetNumberOfThreads(config.num_threads)
    return method


def _registration(mask_image: sitk.Image, transform: sitk.Transform, heart_spread: np.ndarray,
                  unit_mm: float, config: AffineRegistrationConfig
                  ) -> sitk.ImageRegistrationMethod:
    """The multi-resolution fit, in physical units of ``unit_mm`` (see :func:`_fit`)."""
    method = _base_method(mask_image, config)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=config.learning_rate / unit_mm, minStep=config.min_step / unit_mm,
        numberOfIterations=config.iterations, relaxationFactor=config.relaxation,
        gradientMagnitudeTolerance=1e-8)
    method.SetOptimizerScales(_parameter_scales(transform, heart_spread))
    method.SetShrinkFactorsPerLevel([int(f) for f in config.shrink_factors])
    method.SetSmoothingSigmasPerLevel([s / unit_mm for s in config.smoothing_sigmas_mm])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(transform, inPlace=True)
    return method


def _parameter_scales(transform: sitk.Transform, heart_spread: np.ndarray) -> list[float]:
    """Mean squared shift of the heart (in heart radii) per unit change of each parameter.

    SimpleITK's own estimate uses the corners of the fixed image, which overweights rotation and
    scale relative to the heart they move and leaves them under-converged.
    """
    radial = float(heart_spread.sum())
    if isinstance(transform, sitk.AffineTransform):
        spread_x, spread_y = (float(v) for v in heart_spread)
        return [spread_x, spread_y, spread_x, spread_y, 1.0, 1.0]
    if isinstance(transform, sitk.Similarity2DTransform):
        return [radial, radial, 1.0, 1.0]
    return [radial, 1.0, 1.0]


def _metric_value(fixed_image: sitk.Image, moving_image: sitk.Image, mask_image: sitk.Image,
                  transform: sitk.Transform, config: AffineRegistrationConfig) -> float:
    """Full-resolution metric at ``transform``, the same yardstick for every model."""
    method = _base_method(mask_image, config)
    method.SetInitialTransform(transform, inPlace=False)
    return float(method.MetricEvaluate(fixed_image, moving_image))


def _error_summary(error: Exception) -> str:
    """ITK puts the reason on the last line of its multi-line message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _json_float(value: float) -> float | None:
    return value if math.isfinite(value) else None
