"""Held-out test cases, read so that their labels cannot shape their inputs.

A test volume written by our preprocessing holds its case on the whole crop grid, made without
the label (:mod:`preprocessing.runner`), and its manifest records the grids. Such a case is
predicted by the label-free path of new patients (:func:`prediction.pipeline.predict_stacks`:
localisation, registration as in training, ROI) and scored twice:

* on the crop grid, against the label resampled onto it (``grid`` scores);
* in native space: the probabilities are mapped onto the labelled sequence's native voxels and
  compared with the raw label file, with the native voxel spacing (``native`` scores). Slices
  the grids do not cover count as predicted background.

Volumes without that record (the release's processed layout, or volumes we wrote before test
volumes became label-free) already are the 128 ROI that someone cut; they are predicted as they
are and reported as "ROI given".

The label is read here for one purpose: scoring. Nothing derived from it reaches the network.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datasets.processed import ProcessedLayout
from datasets.raw import RawDataError, Volume, read_volume
from preprocessing.grid_stacks import GridStacks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NativeTruth:
    """The raw label and the native volume it is drawn on; ``slices[i]`` is the slice of that
    volume that grid ``i`` covers."""

    volume: Volume
    label: Volume
    slices: list[int]

    @property
    def spacing(self) -> tuple[float, float, float]:
        return self.volume.spacing


@dataclass(frozen=True)
class TestCase:
    """One held-out case: ``image [D, S, H, W]`` in [0, 1] and ``label [D, H, W]`` as stored,
    ``stacks`` for the label-free path (None: the ROI was given), ``native`` for native scores
    (None when the raw files are not at hand)."""

    name: str
    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]
    stacks: GridStacks | None
    native: NativeTruth | None

    @property
    def roi_given(self) -> bool:
        return self.stacks is None


def read_test_case(layout: ProcessedLayout, name: str, *, native: bool = True) -> TestCase:
    """Read test volume ``name`` with what the label-free path and native scoring need."""
    stored = layout.read_stored_volume(name)
    manifest = _manifest(layout, name)
    record = (manifest or {}).get("test_volume")
    if record is None:
        return TestCase(name, stored.unit_images(), stored.label, stored.spacing, None, None)
    sources = manifest.get("sources", {})
    volumes = _readable({key: sources[key] for key in record["present"] if key in sources}, name)
    # Our label-free volumes hold exactly what grid_stacks made of the raw files ([0, 255]).
    stacks = GridStacks.from_record(record, stored.images, volumes)
    image = stored.unit_images()
    truth = None
    label_source, owner = sources.get("label"), manifest.get("label_modality")
    if native and label_source and owner in volumes:
        try:
            label = read_volume(label_source, is_label=True)
        except RawDataError as error:
            log.warning("%s: no native scores (%s)", name, error)
        else:
            if not volumes[owner].same_geometry(label):
                raise ValueError(f"{label_source}: no longer on the grid of {owner} "
                                 f"({volumes[owner].source}) as when {name} was preprocessed")
            truth = NativeTruth(volumes[owner], label, stacks.partners[owner])
    elif native:
        log.warning("%s: the raw files named in its manifest are not readable here: no native "
                    "scores", name)
    return TestCase(name, image, stored.label, stored.spacing, stacks, truth)


def iter_test_cases(layout: ProcessedLayout, names: Sequence[str], *,
                    native: bool = True) -> Iterator[TestCase]:
    """:func:`read_test_case` for each name, lazily."""
    for name in names:
        yield read_test_case(layout, name, native=native)


def _manifest(layout: ProcessedLayout, name: str) -> dict | None:
    path = layout.manifest_dir() / f"{name}.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path}: unreadable manifest ({error})") from error


def _readable(paths: dict[str, str], name: str) -> dict[str, Volume]:
    """The native volumes that can be read; registration falls back to the grid images and
    native scores are skipped for the others."""
    volumes = {}
    for key, path in paths.items():
        if not Path(path).is_file():
            continue
        try:
            volumes[key] = read_volume(path)
        except RawDataError as error:
            log.warning("%s: %s", name, error)
    return volumes
