"""The seed's processed layout: per-sequence 2D training slices and 3D test volumes.

::

    <root>/<sequence>/train_npz/<case>_slice<NNN>.npz      keys image [H, W], label [H, W]
    <root>/<sequence>/test_vol_h5/<case>.npy.h5            datasets image [D, H, W], label [D, H, W]
    <root>/lists/train.txt, <root>/lists/test_vol.txt      one slice / case name per line

Images are stored in [0, 255] by our preprocessing (the seed's convention); readers return [0, 1]
float32. The labels of the three sequences are identical after registration; the LGE copy (the
labelled reference) is the one returned. Our volumes carry an optional ``spacing`` attribute
(slice, row, column mm) that seed files lack; readers fall back to a default.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from datasets.labels import MODALITIES
from utils import atomic_path, write_text

SPLITS = {"train": ("train_npz", ".npz"), "test_vol": ("test_vol_h5", ".npy.h5")}
LABEL_SOURCE = "LGE"
#: Spacing assumed for seed volumes without a ``spacing`` attribute (1 mm in-plane after
#: preprocessing; the MyoPS380 slice gap is about 10 mm).
DEFAULT_SPACING = (10.0, 1.0, 1.0)
#: Where the release keeps preprocess_data.py's output (train.py's default data root).
DEFAULT_PROCESSED_ROOT = "MyoPS380_dataset/Processed_data"
#: Axis order of our test volumes, stored as their ``axes`` attribute.
AXES = "DHW"


class ProcessedDataError(ValueError):
    """A processed file or list is missing or malformed (message names the path)."""


@dataclass(frozen=True)
class ProcessedLayout:
    """Path conventions of one processed dataset root."""

    root: Path
    modalities: tuple[str, ...] = MODALITIES
    list_dir: Path | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))
        if self.list_dir is None:
            object.__setattr__(self, "list_dir", self.root / "lists")
        unknown = set(self.modalities) - set(MODALITIES)
        if unknown or not self.modalities:
            raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got "
                             f"{self.modalities}")

    def item_path(self, modality: str, split: str, name: str) -> Path:
        folder, suffix = _split(split)
        return self.root / modality / folder / f"{name}{suffix}"

    def list_path(self, split: str) -> Path:
        _split(split)
        assert self.list_dir is not None
        return self.list_dir / f"{split}.txt"

    def scan(self, split: str) -> list[str]:
        """Names present for every sequence (what a list for ``split`` should contain)."""
        folder, suffix = _split(split)
        present = None
        for modality in self.modalities:
            directory = self.root / modality / folder
            names = {p.name[: -len(suffix)] for p in directory.glob(f"*{suffix}")
                     if not p.name.startswith(".")}
            present = names if present is None else present & names
        return sorted(present or ())

    def case_ids(self) -> set[str]:
        """Every case the root holds, as training slices or as a test volume."""
        return {case_of(name) for split in SPLITS for name in self.scan(split)}

    def names(self, split: str, *, create: bool = True) -> list[str]:
        """Entries of the ``split`` list, writing it from the files on disk when absent.

        Every listed entry must exist for every sequence; a list naming absent files is an error
        rather than a crash in the middle of an epoch.
        """
        path = self.list_path(split)
        if path.is_file():
            names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        else:
            names = self.scan(split)
            if names and create:
                write_text(path, "".join(f"{name}\n" for name in names))
        if not names:
            pattern = self.item_path(self.modalities[0], split, "*")
            raise ProcessedDataError(f"{self.root}: no '{split}' data found (looked for {pattern})")
        for name in names:
            for modality in self.modalities:
                if not self.item_path(modality, split, name).is_file():
                    raise ProcessedDataError(
                        f"{path}: lists {name!r} but {self.item_path(modality, split, name)} "
                        "does not exist")
        return names

    def check_disjoint(self) -> None:
        """Refuse lists that put one case in both training and testing.

        Every case is stored in both forms (training slices and a test volume), so only the
        lists keep a test case out of training; a stale or hand-edited list could leak it.
        """
        paths = [self.list_path(split) for split in SPLITS]
        if not all(path.is_file() for path in paths):
            return
        train = {case_of(name) for name in self.names("train", create=False)}
        test = set(self.names("test_vol", create=False))
        both = sorted(train & test)
        if both:
            raise ProcessedDataError(f"{paths[0]} and {paths[1]} both list case(s) {both}: a "
                                     "test case must not train")

    def manifest_dir(self) -> Path:
        return self.root / "manifests"

    def recorded_preprocessing(self) -> dict | None:
        """The preprocessing config stored in the case manifests, if any.

        Every case of a root is written with one config; a checkpoint keeps it so that
        prediction on new patients can rebuild the grid the network was trained on.
        """
        return self._recorded("config", dict)

    def recorded_voxelmorph(self) -> str | None:
        """SHA-256 of the non-rigid network the case manifests record (None: none recorded)."""
        return self._recorded("voxelmorph_sha256", str)

    def _recorded(self, key: str, kind: type) -> Any:
        """``key`` of the first readable case manifest that holds one of type ``kind``."""
        for path in sorted(self.manifest_dir().glob("*.json")):
            try:
                value = json.loads(path.read_text()).get(key)
            except (OSError, ValueError, AttributeError):
                continue
            if isinstance(value, kind):
                return value
        return None

    def read_slice(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """One training slice: image ``[S, H, W]`` in [0, 1] and label ``[H, W]`` (uint8)."""
        images, label = [], None
        for modality in self.modalities:
            path = self.item_path(modality, "train", name)
            try:
                with np.load(path) as data:
                    image, this_label = data["image"], data["label"]
            except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as error:
                # A truncated or empty .npz raises BadZipFile or EOFError, not OSError.
                raise ProcessedDataError(f"{path}: unreadable training slice "
                                         f"({type(error).__name__}: {error})") from error
            images.append(_check_image(image, path, ndim=2))
            if images[-1].shape != images[0].shape:
                raise ProcessedDataError(f"{path}: slice of size {image.shape}, but the "
                                         f"{self.modalities[0]} slice {name} is "
                                         f"{images[0].shape}")
            if label is None or modality == LABEL_SOURCE:
                label = _check_label(this_label, image.shape, path)
        assert label is not None
        return np.stack(images), label

    def check_slices(self, names: Sequence[str]) -> None:
        """Read every listed training slice once, before training: a truncated file or a slice
        whose sequences differ in size must stop the run at its start with the path, not hours
        into it."""
        for name in names:
            self.read_slice(name)

    def read_volume(self, name: str) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
        """One test volume: image ``[D, S, H, W]`` in [0, 1], label ``[D, H, W]``, spacing (mm)."""
        stored = self.read_stored_volume(name)
        return stored.unit_images(), stored.label, stored.spacing

    def read_stored_volume(self, name: str) -> StoredVolume:
        """One test volume as stored (images not rescaled), in ``[D, ...]`` slice order.

        Our files say their axis order (``axes = "DHW"``, or a ``spacing`` attribute, which only
        we write). The release's files are nibabel ``(X, Y, Z)`` arrays read as ``image[:, :, k]``
        per slice: a file without either attribute whose first two axes are equal is taken as
        that and its last axis becomes the slice axis, as the release reads it. Anything else is
        refused rather than silently read along the wrong axis.
        """
        images, label, spacing, paths = [], None, None, []
        for modality in self.modalities:
            path = self.item_path(modality, "test_vol", name)
            try:
                with h5py.File(path, "r") as handle:
                    image, this_label = handle["image"][()], handle["label"][()]
                    attrs = dict(handle.attrs)
            except (OSError, KeyError) as error:
                raise ProcessedDataError(f"{path}: unreadable test volume ({error})") from error
            if image.ndim != 3:
                raise ProcessedDataError(f"{path}: image has {image.ndim} dimensions, expected 3")
            if this_label.shape != image.shape:
                raise ProcessedDataError(f"{path}: label shape {this_label.shape} != image "
                                         f"shape {image.shape}")
            ours = attrs.get("axes") == AXES or "spacing" in attrs
            if not ours:
                if image.shape[0] != image.shape[1]:
                    raise ProcessedDataError(
                        f"{path}: image {image.shape} has no 'axes' attribute and is not the "
                        "release's (X, Y, Z) layout (square first two axes); cannot tell its "
                        "slice axis")
                image, this_label = np.moveaxis(image, -1, 0), np.moveaxis(this_label, -1, 0)
            images.append(np.ascontiguousarray(image, dtype=np.float32))
            paths.append(path)
            if not np.all(np.isfinite(images[-1])):
                raise ProcessedDataError(f"{path}: image holds NaN/Inf")
            if label is None or modality == LABEL_SOURCE:
                label = _check_label(np.ascontiguousarray(this_label), image.shape, path)
                spacing = (tuple(float(v) for v in attrs["spacing"]) if "spacing" in attrs
                           else DEFAULT_SPACING)
        assert label is not None and spacing is not None
        shapes = {image.shape for image in images}
        if len(shapes) != 1:
            raise ProcessedDataError(f"{self.root}: sequences of {name} differ in shape {shapes}")
        return StoredVolume(name, np.stack(images, axis=1), label, spacing, paths)  # type: ignore[arg-type]


@dataclass(frozen=True)
class StoredVolume:
    """A test volume as stored: images ``[D, S, H, W]`` (our files: [0, 255]), label, spacing."""

    name: str
    images: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]
    paths: list[Path]

    def unit_images(self) -> np.ndarray:
        """``images`` in [0, 1], each sequence by :func:`_unit_range`."""
        return np.stack([_unit_range(self.images[:, i]) for i in range(self.images.shape[1])],
                        axis=1)


def write_test_volume(path: Path, image: np.ndarray, label: np.ndarray,
                      spacing: Sequence[float]) -> None:
    """Write one seed-layout test volume atomically, with our ``spacing`` and ``axes``
    attributes (``[D, H, W]``; the release's files are ``(X, Y, Z)``)."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as handle:
        handle.create_dataset("image", data=image.astype(np.float32), compression="gzip")
        handle.create_dataset("label", data=label.astype(np.uint8), compression="gzip")
        handle.attrs["spacing"] = np.asarray(spacing, dtype=np.float64)
        handle.attrs["axes"] = AXES


def case_of(slice_name: str) -> str:
    """The case a training slice belongs to: ``case0001_slice003`` -> ``case0001``."""
    case, separator, index = slice_name.rpartition("_slice")
    return case if separator and index.isdigit() else slice_name


def write_training_slice(path: Path, image: np.ndarray, label: np.ndarray) -> None:
    """Write one seed-layout training slice atomically."""
    with atomic_path(path) as tmp:
        np.savez(tmp, image=image.astype(np.float32), label=label.astype(np.uint8))


def _split(split: str) -> tuple[str, str]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    return SPLITS[split]


def _check_image(image: np.ndarray, path: Path, ndim: int) -> np.ndarray:
    if image.ndim != ndim:
        raise ProcessedDataError(f"{path}: image has {image.ndim} dimensions, expected {ndim}")
    image = image.astype(np.float32, copy=False)
    if not np.all(np.isfinite(image)):
        raise ProcessedDataError(f"{path}: image holds NaN/Inf")
    return _unit_range(image)


def _unit_range(image: np.ndarray) -> np.ndarray:
    """Seed files are in [0, 255]; files already in [0, 1] are accepted unchanged."""
    return image / 255.0 if image.max(initial=0.0) > 1.0 else image


def _check_label(label: np.ndarray, shape: tuple[int, ...], path: Path) -> np.ndarray:
    if label.shape != shape:
        raise ProcessedDataError(f"{path}: label shape {label.shape} != image shape {shape}")
    if label.size and (label.min() < 0 or label.max() > 3):
        raise ProcessedDataError(f"{path}: label values outside 0..3")
    return label.astype(np.uint8, copy=False)
