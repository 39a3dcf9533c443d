"""Rendering and acquisition of one phantom sequence from the anatomy model.

:func:`render` samples :mod:`datasets.phantom_anatomy` on a sequence's own voxel grid (moved by
its misalignment) into relative signal and label codes: supersampled partial volume at tissue
edges and a slab-averaged slice profile through the heart, where shapes change fastest along z.
:func:`acquire` turns the signal into a scanner image: point-spread blur, coil bias, a mild
per-slice inhomogeneity, Rician noise and intensity scaling. Split from
:mod:`datasets.phantom` so the imaging physics sits apart from case drawing and file writing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy import ndimage

from datasets.misalignment import displacement_grid, linear_part, spline_grid
from datasets.phantom_anatomy import (
    CODES,
    REGION_CLASS,
    background_at,
    heart_bounds,
    paint_heart,
    regions_at,
    uniform,
)
from datasets.phantom_config import PhantomConfig


def grid_axes(seq: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """World x and y of the voxel centres of a sequence."""
    affine, (nx, ny, _) = np.asarray(seq["affine"]), seq["shape"]
    return affine[0, 3] + affine[0, 0] * np.arange(nx), affine[1, 3] + affine[1, 1] * np.arange(ny)


def _sampling_grid(seq: Mapping[str, Any], fields: list[np.ndarray] | None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Anatomy-frame position of every voxel centre ``[nz, nx, ny]``; each slice's linear part."""
    xs, ys = grid_axes(seq)
    nz = seq["shape"][2]
    qx = np.empty((nz, xs.size, ys.size), np.float32)
    qy = np.empty_like(qx)
    linear = np.tile(np.eye(2), (nz, 1, 1))
    for k in range(nz):
        if seq["misalignment"] is None:
            qx[k], qy[k] = xs[:, None], ys[None, :]
            continue
        sl = seq["misalignment"]["slices"][k]
        linear[k] = linear_part(sl)
        (cx, cy), (tx, ty) = sl["centre_mm"], sl["translation_mm"]
        u, v = xs[:, None] - cx, ys[None, :] - cy
        disp = displacement_grid(sl["nonrigid"], xs, ys) if fields is None else fields[k]
        qx[k] = cx + tx + linear[k, 0, 0] * u + linear[k, 0, 1] * v + disp[0]
        qy[k] = cy + ty + linear[k, 1, 0] * u + linear[k, 1, 1] * v + disp[1]
    return qx, qy, linear


def _edges(regions: np.ndarray) -> np.ndarray:
    """Pixels ``[nz, nx, ny]`` whose region differs from an in-plane neighbour at any depth."""
    edge = np.zeros((regions.shape[0], *regions.shape[2:]), bool)
    for axis in (1, 2):
        step = np.diff(regions, axis=axis + 1).any(axis=1)
        ahead, behind = [slice(None)] * 3, [slice(None)] * 3
        ahead[axis], behind[axis] = slice(1, None), slice(None, -1)
        edge[tuple(ahead)] |= step
        edge[tuple(behind)] |= step
    return edge


def _vote(regions: np.ndarray, axis: int) -> np.ndarray:
    """Label class held by most samples along ``axis`` (ties go to the lower class)."""
    classes = REGION_CLASS[regions]
    counts = np.stack([(classes == c).sum(axis=axis, dtype=np.int16) for c in range(CODES.size)])
    return counts.argmax(axis=0).astype(np.uint8)


def render(anat: Mapping[str, Any], seq: Mapping[str, Any], lut: np.ndarray,
           config: PhantomConfig, fields: list[np.ndarray] | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """Relative signal and label codes ``[nx, ny, nz]`` of one sequence.

    The chest is sampled at the slab centre, the heart at ``sub_slices`` depths through the slab
    (its shape changes quickly along z), and pixels on any tissue edge again ``supersample**2``
    times in-plane, so edges carry partial volume without supersampling the whole field of view.
    Labels take the majority of the same samples. Sub-pixel samples share their pixel's non-rigid
    displacement, which changes by hundredths of a millimetre across a pixel.
    """
    qx, qy, linear = _sampling_grid(seq, fields)
    nz = qx.shape[0]
    zs = np.asarray(seq["slice_z_mm"], np.float32)
    nsub = config.sub_slices
    dz = (seq["slice_thickness_mm"] * ((np.arange(nsub) + 0.5) / nsub - 0.5)).astype(np.float32)
    chest = np.stack([background_at(anat, qx[k], qy[k], float(zs[k])) for k in range(nz)])
    edge = _edges(chest[:, None])
    signal, classes = lut[chest], REGION_CLASS[chest]
    cx, cy, radius = heart_bounds(anat["heart"], zs[:, None, None])
    near = ((qx - cx) ** 2 + (qy - cy) ** 2 < (radius + 2) ** 2).any(axis=0)
    if near.any():
        # The heart's box: everything outside it is chest only, sampled at the slab centre.
        rows, cols = np.flatnonzero(near.any(axis=1)), np.flatnonzero(near.any(axis=0))
        box = (slice(None), slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        heart = np.repeat(chest[box][:, None], nsub, axis=1)
        for k in range(nz):
            for d in range(nsub):
                paint_heart(anat, qx[box][k], qy[box][k], float(zs[k] + dz[d]), heart[k, d])
        signal[box] = lut[heart].mean(axis=1)
        classes[box] = _vote(heart, axis=1)
        edge[box] |= _edges(heart)
        near[box[1:]] = True
    m = config.supersample
    offset = ((np.arange(m) + 0.5) / m - 0.5) * seq["spacing_mm"][0]
    ox, oy = (grid.ravel() for grid in np.meshgrid(offset, offset, indexing="ij"))
    for in_box, depths in ((False, np.zeros(1, np.float32)), (True, dz)):
        k, i, j = np.nonzero(edge & (near[None] == in_box))
        if not k.size:
            continue
        lin = linear[k]
        sx = (qx[k, i, j][:, None] + lin[:, 0, :1] * ox + lin[:, 0, 1:] * oy).astype(np.float32)
        sy = (qy[k, i, j][:, None] + lin[:, 1, :1] * ox + lin[:, 1, 1:] * oy).astype(np.float32)
        sub = np.empty((k.size, depths.size, m * m), np.uint8)
        bounds = np.searchsorted(k, np.arange(nz + 1))  # np.nonzero sorts by slice
        sample = regions_at if in_box else background_at
        for kk in range(nz):
            part = slice(bounds[kk], bounds[kk + 1])
            for d, depth in enumerate(depths):
                if bounds[kk] < bounds[kk + 1]:
                    sub[part, d] = sample(anat, sx[part], sy[part], float(zs[kk] + depth))
        sub = sub.reshape(k.size, -1)
        signal[k, i, j] = lut[sub].mean(axis=1)
        classes[k, i, j] = _vote(sub, axis=1)
    return np.moveaxis(signal, 0, -1), np.moveaxis(CODES[classes], 0, -1)


def acquire(signal: np.ndarray, seq: Mapping[str, Any], rng: np.random.Generator,
            config: PhantomConfig) -> tuple[np.ndarray, dict[str, Any]]:
    """Blur, coil bias, mild inhomogeneity, Rician noise and scanner scaling of a signal volume.

    The image is the magnitude of complex data, so noise is added to real and imaginary parts
    before taking the modulus; that gives the Rician floor seen in air and nulled myocardium.
    """
    s = seq["spacing_mm"][0]
    if config.blur_mm > 0:  # acquired at lower resolution than reconstructed
        signal = ndimage.gaussian_filter(signal, (config.blur_mm / s, config.blur_mm / s, 0))
    xs, ys = grid_axes(seq)
    half = config.fov_mm / 2
    xn = ((xs - seq["fov_centre_mm"][0]) / half).astype(np.float32)[:, None, None]
    yn = ((ys - seq["fov_centre_mm"][1]) / half).astype(np.float32)[None, :, None]
    zs = np.asarray(seq["slice_z_mm"])
    zn = ((zs - zs.mean()) / 300.0).astype(np.float32)[None, None, :]
    c = rng.standard_normal(6).astype(np.float32)
    field = c[0] * xn + c[1] * yn + c[2] * xn * yn + c[3] * xn**2 + c[4] * yn**2 + c[5] * zn
    field -= field.mean()
    field /= max(float(np.abs(field).max()), 1e-12)
    low, high = config.bias_range
    gain = (low + high) / 2 + (high - low) / 2 * uniform(rng, 0.5, 1.0) * field
    bias_min, bias_max = float(gain.min()), float(gain.max())
    g = 20.0  # mm between nodes of the per-slice inhomogeneity field
    nodes = [math.ceil((axis[-1] - axis[0]) / g) + 3 for axis in (xs, ys)]
    texture = spline_grid(rng.standard_normal((signal.shape[2], *nodes)).astype(np.float32),
                           (xs[0] - g, ys[0] - g), g, xs, ys)
    texture *= config.texture / max(float(texture.std()), 1e-12)
    gain *= np.moveaxis(np.clip(1 + texture, 0.5, 1.5), 0, -1)
    sigma = 0.0 if math.isinf(config.snr) else 1.0 / config.snr
    noise = rng.standard_normal((2, *signal.shape), dtype=np.float32)
    noise *= sigma
    noise[0] += signal * gain
    peak = uniform(rng, *config.peak_intensity)
    image = np.hypot(noise[0], noise[1])
    image *= peak
    if config.dtype == "int16":
        image = np.clip(np.rint(image), 0, np.iinfo(np.int16).max).astype(np.int16)
    record = {"peak": peak, "noise_sigma": sigma * peak, "bias_min": bias_min,
              "bias_max": bias_max}
    return image, record
