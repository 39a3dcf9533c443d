"""Small builders used by several test modules."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from datasets.rings import ring_slice, write_ring_dataset  # noqa: F401 (re-exported)
from prompts.bank import PriorBank, random_prior_bank


def write_nifti(path: Path, zyx: np.ndarray, affine: np.ndarray) -> Path:
    """Write a ``[Z, Y, X]`` array as NIfTI (stored x, y, z like scanner exports)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(zyx.transpose(2, 1, 0)), affine), str(path))
    return path


def axis_affine(spacing_xyz: tuple[float, float, float],
                origin: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    affine = np.diag([*spacing_xyz, 1.0])
    affine[:3, 3] = origin
    return affine


def random_bank(dim: int = 16, seed: int = 0) -> PriorBank:
    """A small random prior bank for plumbing tests."""
    return random_prior_bank(dim, seed, model_id="test/random")
