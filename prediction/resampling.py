"""Steps 1-2 of preprocessing for an unlabelled patient: matched slices on the 1 mm plane grids.

This is :func:`preprocessing.pipeline.align_case` up to the point where it needs the label:
reference slices keep only when every given sequence has a partner slice within
``max_slice_distance_mm``; each kept slice gets a :class:`~preprocessing.resample.PlaneGrid`
centred on it; every sequence is resampled onto those grids and put through the same percentile
window. The network therefore sees the same pixel size and intensity scale as in training, provided
the :class:`~preprocessing.pipeline.PreprocessConfig` is the one the training data were made with.
What training does next (the ROI around the label's myocardium) is replaced by
:mod:`prediction.localisation`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from datasets.labels import MODALITIES
from prediction.inputs import PatientImages
from preprocessing.intensity import apply_window, normalise_to_255
from preprocessing.pipeline import PreprocessConfig
from preprocessing.resample import PlaneGrid, sample_slice
from preprocessing.slice_matching import match_slices


@dataclass(frozen=True)
class GridStacks:
    """A patient on the reference grids.

    ``images`` is ``[D, S, crop, crop]`` in [0, 255] with channels in MODALITIES order and absent
    sequences all zero; ``kept[i]`` is the reference slice that grid ``i`` lies on and
    ``partners[name][i]`` the slice of ``name`` resampled there.
    """

    reference: str
    present: tuple[str, ...]
    kept: tuple[int, ...]
    dropped: tuple[int, ...]
    partners: dict[str, list[int]]
    distances_mm: dict[str, list[float]]
    grids: list[PlaneGrid]
    images: np.ndarray
    windows: dict[str, tuple[float, float]]

    @property
    def presence(self) -> np.ndarray:
        """``[S]`` bool, True for the given sequences."""
        return np.array([name in self.present for name in MODALITIES])

    def roi(self, origin: tuple[int, int], size: int) -> np.ndarray:
        """``[D, S, size, size]`` crop of ``images`` at ``origin = (row0, col0)``."""
        row0, col0 = origin
        return np.ascontiguousarray(self.images[:, :, row0:row0 + size, col0:col0 + size])


def resample_patient(patient: PatientImages, config: PreprocessConfig) -> GridStacks:
    """Match slices to the reference, resample every given sequence, normalise to [0, 255]."""
    volumes = patient.volumes
    reference = patient.reference
    ref_volume = volumes[reference]
    matches = {name: match_slices(ref_volume, volumes[name], config.max_slice_distance_mm)
               for name in patient.present}
    kept = tuple(k for k in range(ref_volume.num_slices)
                 if all(match.partner[k] is not None for match in matches.values()))
    if not kept:
        distances = {name: [round(d, 1) for d in match.distance_mm]
                     for name, match in matches.items()}
        raise ValueError(
            f"{patient.case_id}: no {reference} slice ({ref_volume.source}) has a partner within "
            f"{config.max_slice_distance_mm} mm in every given sequence; distances {distances}")
    partners = {name: [int(match.partner[k]) for k in kept] for name, match in matches.items()}
    grids = [PlaneGrid.centred_on_slice(ref_volume, k, config.crop_size,
                                        config.pixel_spacing_mm) for k in kept]
    size = config.crop_size
    images = np.zeros((len(kept), len(MODALITIES), size, size), dtype=np.float32)
    windows = {}
    for channel, name in enumerate(MODALITIES):
        if name not in volumes:
            continue
        stack = np.stack([sample_slice(volumes[name], partners[name][i], grid, is_label=False)
                          for i, grid in enumerate(grids)])
        images[:, channel], windows[name] = normalise_to_255(
            stack, config.low_percentile, config.high_percentile,
            source=str(volumes[name].source))
    return GridStacks(
        reference=reference, present=patient.present, kept=kept,
        dropped=tuple(k for k in range(ref_volume.num_slices) if k not in kept),
        partners=partners,
        distances_mm={name: [float(match.distance_mm[k]) for k in kept]
                      for name, match in matches.items()},
        grids=grids, images=images, windows=windows)


def resample_through_fields(patient: PatientImages, stacks: GridStacks, name: str,
                            fields: list[np.ndarray]) -> np.ndarray:
    """``[D, h, w]`` of sequence ``name`` sampled through per-slice grid-position fields.

    Registration moves a sequence by fields on the reference grid; sampling the native slice
    through them (and the sequence's stored window) interpolates the native image only once,
    as :func:`preprocessing.pipeline.align_case` does.
    """
    if name not in stacks.windows:
        raise ValueError(f"sequence {name!r} was not given")
    if len(fields) != len(stacks.grids):
        raise ValueError(f"need one field per kept slice ({len(stacks.grids)}), got {len(fields)}")
    volume = patient.volumes[name]
    stack = np.stack([sample_slice(volume, stacks.partners[name][i], grid, is_label=False,
                                   field=fields[i])
                      for i, grid in enumerate(stacks.grids)])
    return apply_window(stack, stacks.windows[name])
