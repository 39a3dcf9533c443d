"""Steps 1-2 of preprocessing, label-free: matched slices on the 1 mm plane grids.

One function serves every path that turns native volumes into network inputs: training cases
(:func:`preprocessing.pipeline.align_case`, which then places its ROI from the label), test
volumes (written on the whole grid, without any label, see :mod:`preprocessing.runner`) and new
patients (:mod:`prediction.pipeline`). Reference slices are kept when every given sequence has a
partner slice within ``max_slice_distance_mm``; each kept slice gets a
:class:`~preprocessing.resample.PlaneGrid` centred on it; every sequence is resampled onto those
grids and put through its own percentile window.

The reference is the sequence with the fewest slices (the seed's rule), ties going to
``prefer``: LGE for label-free inputs (the sequence MyoPS labels are drawn on, and the one scar
is read from), the labelled sequence for training cases.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from scipy import ndimage

from datasets.labels import MODALITIES
from datasets.raw import Volume
from preprocessing.intensity import apply_window, normalise_to_255
from preprocessing.resample import PlaneGrid, sample_slice
from preprocessing.slice_matching import choose_reference, match_slices

#: Ties of the fewest-slices rule go to this sequence when no label says otherwise.
PREFERRED_REFERENCE = "LGE"


@dataclass(frozen=True)
class GridStacks:
    """A case on the reference grids.

    ``images`` is ``[D, S, crop, crop]`` in [0, 255] with channels in MODALITIES order and absent
    sequences all zero; ``kept[i]`` is the reference slice that grid ``i`` lies on and
    ``partners[name][i]`` the slice of ``name`` resampled there. ``volumes`` holds the native
    volumes when they are at hand (registration then samples them once through its fields);
    without them, registered sequences are interpolated from ``images``.
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
    volumes: Mapping[str, Volume] = field(default_factory=dict, repr=False, compare=False)

    @property
    def presence(self) -> np.ndarray:
        """``[S]`` bool, True for the given sequences."""
        return np.array([name in self.present for name in MODALITIES])

    @property
    def depth(self) -> int:
        return len(self.grids)

    def channel(self, name: str) -> np.ndarray:
        """``[D, crop, crop]`` stack of sequence ``name``."""
        return self.images[:, MODALITIES.index(name)]

    def with_sequences(self, names: Sequence[str]) -> GridStacks:
        """The same grids with only ``names`` given (the other channels zeroed), as when a
        sequence is missing at test time; grids and windows stay those of the full case."""
        missing = [name for name in names if name not in self.present]
        if missing:
            raise ValueError(f"sequence(s) {missing} were not given (given: {self.present})")
        images = self.images.copy()
        for channel, name in enumerate(MODALITIES):
            if name not in names:
                images[:, channel] = 0.0
        return replace(self, present=tuple(n for n in MODALITIES if n in names), images=images,
                       windows={n: w for n, w in self.windows.items() if n in names},
                       volumes={n: v for n, v in self.volumes.items() if n in names})

    def roi(self, origin: tuple[int, int], size: int) -> np.ndarray:
        """``[D, S, size, size]`` crop of ``images`` at ``origin = (row0, col0)``."""
        row0, col0 = origin
        return np.ascontiguousarray(self.images[:, :, row0:row0 + size, col0:col0 + size])

    def resample(self, name: str, fields: Sequence[np.ndarray]) -> np.ndarray:
        """``[D, h, w]`` of sequence ``name`` sampled at per-slice grid positions ``[2, h, w]``.

        With the native volume at hand it is sampled once through the fields and the stored
        window, as training preprocessing does; otherwise the grid stack is interpolated
        (linear, edges clamped).
        """
        if name not in self.windows:
            raise ValueError(f"sequence {name!r} was not given")
        if len(fields) != self.depth:
            raise ValueError(f"need one field per kept slice ({self.depth}), got {len(fields)}")
        volume = self.volumes.get(name)
        if volume is not None:
            stack = np.stack([sample_slice(volume, self.partners[name][i], grid, is_label=False,
                                           field=fields[i])
                              for i, grid in enumerate(self.grids)])
            return apply_window(stack, self.windows[name])
        source = self.channel(name)
        return np.stack([ndimage.map_coordinates(source[i], fields[i], order=1, mode="nearest")
                         for i in range(self.depth)]).astype(np.float32)

    def label_on_grids(self, label: Volume, label_modality: str) -> np.ndarray:
        """``[D, crop, crop]`` uint8: ``label`` (drawn on ``label_modality``'s grid) resampled
        (nearest) onto the grids, for scoring only."""
        if label_modality not in self.partners:
            raise ValueError(f"the label's sequence {label_modality} was not given")
        return np.stack([sample_slice(label, self.partners[label_modality][i], grid,
                                      is_label=True)
                         for i, grid in enumerate(self.grids)]).astype(np.uint8)

    def record(self) -> dict:
        """JSON-ready description (no images) from which :func:`from_record` rebuilds it."""
        return {"reference": self.reference, "present": list(self.present),
                "kept": list(self.kept), "dropped": list(self.dropped),
                "partners": self.partners, "distances_mm": self.distances_mm,
                "grids": [grid.to_dict() for grid in self.grids], "windows": self.windows}

    @classmethod
    def from_record(cls, record: Mapping, images: np.ndarray,
                    volumes: Mapping[str, Volume] | None = None) -> GridStacks:
        """Rebuild from :meth:`record` and the ``[D, S, crop, crop]`` images stored with it."""
        grids = [PlaneGrid.from_dict(grid) for grid in record["grids"]]
        if images.shape[0] != len(grids) or images.shape[1] != len(MODALITIES):
            raise ValueError(f"images {images.shape} do not fit {len(grids)} grids of "
                             f"{len(MODALITIES)} sequences")
        return cls(reference=record["reference"], present=tuple(record["present"]),
                   kept=tuple(record["kept"]), dropped=tuple(record["dropped"]),
                   partners={k: list(v) for k, v in record["partners"].items()},
                   distances_mm={k: list(v) for k, v in record["distances_mm"].items()},
                   grids=grids, images=np.asarray(images, dtype=np.float32),
                   windows={k: tuple(v) for k, v in record["windows"].items()},
                   volumes=dict(volumes or {}))


def resample_to_grids(case_id: str, volumes: Mapping[str, Volume], crop_size: int,
                      pixel_spacing_mm: float, max_slice_distance_mm: float,
                      low_percentile: float, high_percentile: float,
                      prefer: str = PREFERRED_REFERENCE) -> GridStacks:
    """Match slices to the reference, resample every given sequence, normalise to [0, 255]."""
    present = tuple(name for name in MODALITIES if name in volumes)
    if not present:
        raise ValueError(f"{case_id}: no input sequence given (need at least one of "
                         f"{list(MODALITIES)})")
    reference = choose_reference({name: volumes[name] for name in present}, prefer=prefer)
    ref_volume = volumes[reference]
    matches = {name: match_slices(ref_volume, volumes[name], max_slice_distance_mm)
               for name in present}
    kept = tuple(k for k in range(ref_volume.num_slices)
                 if all(match.partner[k] is not None for match in matches.values()))
    if not kept:
        distances = {name: [round(d, 1) for d in match.distance_mm]
                     for name, match in matches.items()}
        raise ValueError(
            f"{case_id}: no {reference} slice ({ref_volume.source}) has a partner within "
            f"{max_slice_distance_mm} mm in every given sequence; distances {distances}")
    partners = {name: [int(match.partner[k]) for k in kept] for name, match in matches.items()}
    grids = [PlaneGrid.centred_on_slice(ref_volume, k, crop_size, pixel_spacing_mm)
             for k in kept]
    images = np.zeros((len(kept), len(MODALITIES), crop_size, crop_size), dtype=np.float32)
    windows = {}
    for channel, name in enumerate(MODALITIES):
        if name not in present:
            continue
        stack = np.stack([sample_slice(volumes[name], partners[name][i], grid, is_label=False)
                          for i, grid in enumerate(grids)])
        images[:, channel], windows[name] = normalise_to_255(
            stack, low_percentile, high_percentile, source=str(volumes[name].source))
    return GridStacks(
        reference=reference, present=present, kept=kept,
        dropped=tuple(k for k in range(ref_volume.num_slices) if k not in kept),
        partners=partners,
        distances_mm={name: [float(match.distance_mm[k]) for k in kept]
                      for name, match in matches.items()},
        grids=grids, images=images, windows=windows, volumes=dict(volumes))
