"""Label-free prediction: native images in, a native label map and its record out.

One path serves new patients (predict.py) and held-out test volumes (test.py), so a test score
is what a user gets on a new patient. The steps mirror training's preprocessing with the label
replaced by the network itself:

1. slice matching, 1 mm plane grids and percentile windows
   (:func:`preprocessing.pipeline.grid_stacks`, the very function that writes test volumes);
2. heart localisation by sliding windows over the crop grid (:mod:`prediction.localisation`);
3. the ROI prediction on the crop training would have made; when the training data were
   registered, the other sequences are registered the same way first
   (:func:`preprocessing.registration.register_sequences`: same metric, same non-rigid step),
   with the first-pass myocardium in place of the label, and the ROI is predicted again;
4. probabilities mapped onto the output sequence's native voxels (:mod:`prediction.native`).

Everything needed to check or reproduce the result (heart centre, ROI box, grids, slices used,
intensity windows, registration) goes into the JSON record written beside the label map.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from datasets.labels import CLASS_NAMES, EVAL_GROUPS, MODALITIES, burdens, group_volumes
from datasets.processed import ProcessedLayout
from datasets.raw import Volume, nifti_image
from networks.inference import window_probabilities
from networks.sequences import check_model_inputs
from prediction.inputs import PatientImages
from prediction.localisation import (
    WEIGHTINGS,
    HeartLocation,
    locate_heart,
    sliding_probabilities,
)
from prediction.native import labels_from_probabilities, probabilities_to_native
from preprocessing.config import PreprocessConfig
from preprocessing.grid_stacks import GridStacks
from preprocessing.pipeline import grid_stacks
from preprocessing.registration import Segmenter, register_sequences
from preprocessing.runner import VOXELMORPH_CHECKPOINT
from preprocessing.segmenter import cached_segmenter
from utils import atomic_path, file_sha256, json_text, setting

log = logging.getLogger(__name__)

#: PreprocessConfig fields that shape what the network sees (read from training manifests):
#: the geometry, the intensity window and how the sequences were registered.
GEOMETRY_FIELDS: tuple[str, ...] = ("pixel_spacing_mm", "crop_size", "roi_size",
                                    "max_slice_distance_mm", "low_percentile",
                                    "high_percentile", "affine_registration",
                                    "nonrigid_registration", "affine_metric",
                                    "affine_pooling")
_NIFTI_SUFFIXES = (".nii.gz", ".nii")
#: The sequence the others are registered onto when given (the labelled one in training data).
PREFERRED_FIXED = "LGE"


@dataclass(frozen=True)
class PredictConfig:
    """How a patient is predicted; ``preprocess`` must match the model's training data."""

    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig,
                                         metadata={"cli": False})
    stride: int = setting(48, "localisation window step (px): 3 x 3 windows of 128 on 224")
    weighting: str = setting("gaussian", "how overlapping localisation windows are averaged",
                             choices=WEIGHTINGS)
    min_evidence: float = setting(0.5, cli=False)
    #: register the other sequences as the training data were (``preprocess`` says how)
    register: bool = setting(False, cli=False)
    batch_size: int = setting(32, "images per forward pass (with --tta each slice counts 4 "
                              "times)")
    tta: bool = setting(False, "flip test-time augmentation: average probabilities over 4 "
                        "flips")
    register_rounds: int = setting(
        1, "with registration: rounds of register-then-predict, each registering with the "
        "myocardium the previous round predicted")

    def __post_init__(self) -> None:
        if not isinstance(self.preprocess, PreprocessConfig):
            raise ValueError("preprocess must be a PreprocessConfig")
        if self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if not self.min_evidence > 0:
            raise ValueError(f"min_evidence must be > 0, got {self.min_evidence}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if isinstance(self.register_rounds, bool) or self.register_rounds < 1:
            raise ValueError(f"register_rounds must be >= 1, got {self.register_rounds!r}")

    def to_dict(self) -> dict:
        """Settings that shaped this prediction (training-only preprocessing flags left out)."""
        record = dataclasses.asdict(self)
        preprocess = record.pop("preprocess")
        record["geometry"] = {name: preprocess[name] for name in GEOMETRY_FIELDS}
        if self.register:
            record["registration"] = {key: preprocess[key] for key in (
                "affine_registration", "nonrigid_registration", "affine", "ngf", "mask_fit")}
        return record


@dataclass
class Prediction:
    """Native labels ``[Z, Y, X]`` (uint8) and probabilities ``[Z, K, Y, X]`` on ``output``."""

    case_id: str
    reference: Volume
    labels: np.ndarray
    probabilities: np.ndarray
    record: dict[str, Any]


@dataclass
class GridPrediction:
    """What the label-free path makes of grid stacks: ROI probabilities ``[D, K, roi, roi]`` at
    ``location.origin`` on the crop grid, and the registration it applied."""

    probabilities: np.ndarray
    location: HeartLocation
    registration: dict[str, Any]

    def grid_labels(self, crop_size: int) -> np.ndarray:
        """``[D, crop, crop]`` uint8: the ROI argmax placed on the crop grid, background
        elsewhere."""
        depth, _, size, _ = self.probabilities.shape
        row0, col0 = self.location.origin
        labels = np.zeros((depth, crop_size, crop_size), dtype=np.uint8)
        labels[:, row0:row0 + size, col0:col0 + size] = self.probabilities.argmax(axis=1)
        return labels


@dataclass(frozen=True)
class Registration:
    """The networks the training data's registration used (see
    :func:`registration_networks`), for the same step at prediction time."""

    voxelmorph: Any = None  # preprocessing.voxelmorph_net.VoxelMorph2D
    segmenter: Segmenter | None = None


def predict_stacks(model: nn.Module, img_size: int, stacks: GridStacks, config: PredictConfig,
                   device: torch.device, networks: Registration | None = None
                   ) -> GridPrediction:
    """Localise the heart on the crop grid, register as training did, predict the ROI.

    Nothing here reads a label: test volumes and new patients go through exactly this.
    """
    check_model_inputs(model, stacks.present)
    model.eval()
    geometry = config.preprocess
    fused = sliding_probabilities(model, stacks.images, stacks.present, geometry.roi_size,
                                  config.stride, img_size, device, weighting=config.weighting,
                                  batch_size=config.batch_size)
    location = locate_heart(fused, geometry.roi_size, config.min_evidence)
    roi_images = stacks.roi(location.origin, geometry.roi_size)
    probabilities = window_probabilities(model, roi_images, stacks.present, img_size, device,
                                         config.batch_size, tta=config.tta)
    registration: dict[str, Any] = {}
    networks = networks or Registration()
    nonrigid = geometry.nonrigid_registration and networks.voxelmorph is not None
    if (config.register and len(stacks.present) > 1 and location.found
            and (geometry.affine_registration or nonrigid)):
        fixed = PREFERRED_FIXED if PREFERRED_FIXED in stacks.present else stacks.reference
        for _ in range(config.register_rounds):
            # Each round registers the original stacks, guided by the latest myocardium.
            guide = GridPrediction(probabilities, location, {}).grid_labels(geometry.crop_size)
            roi_images, registered = register_sequences(
                stacks, fixed, guide, location.origin, geometry,
                segmenter=networks.segmenter,
                voxelmorph=networks.voxelmorph if nonrigid else None, device=device)
            probabilities = window_probabilities(model, roi_images, stacks.present, img_size,
                                                 device, config.batch_size, tta=config.tta)
        registration = {"fixed": fixed, "affine": registered.affine,
                        "affine_pooling": registered.pooling,
                        "nonrigid_max_displacement_px": registered.nonrigid_max_px,
                        "rounds": config.register_rounds}
    return GridPrediction(probabilities, location, registration)


def predict_patient(model: nn.Module, img_size: int, patient: PatientImages,
                    config: PredictConfig, device: torch.device,
                    networks: Registration | None = None) -> Prediction:
    """Localise the heart, predict its ROI and map the probabilities to native space."""
    start = time.perf_counter()
    geometry = config.preprocess
    stacks = grid_stacks(patient.case_id, patient.volumes, geometry)
    result = predict_stacks(model, img_size, stacks, config, device, networks)
    location = result.location
    if not location.found:
        log.warning("%s: the network found no myocardium anywhere on the %d mm grid; the ROI is "
                    "the grid centre", patient.case_id, geometry.crop_size)
    output = patient.output
    volume = patient.volumes[output]
    native = probabilities_to_native(result.probabilities, volume, stacks.partners[output],
                                     stacks.grids, location.origin)
    labels = labels_from_probabilities(native)
    middle = stacks.grids[len(stacks.grids) // 2]
    row, col = location.centre
    centre_world = middle.origin + geometry.pixel_spacing_mm * (row * middle.row_axis
                                                                + col * middle.col_axis)
    groups = group_volumes(labels, volume.spacing, EVAL_GROUPS)
    record = {
        "case_id": patient.case_id,
        "sources": {name: str(patient.volumes[name].source) for name in patient.present},
        "cine_frame": patient.cine_frame,
        "sequences_present": list(stacks.present),
        "sequences_absent": [name for name in MODALITIES if name not in stacks.present],
        "reference": stacks.reference,
        "output_sequence": output,
        "output_shape_xyz": list(labels.shape[::-1]),
        "heart": location.to_dict() | {"centre_world_mm": centre_world.tolist()},
        "roi": {"row0": location.origin[0], "col0": location.origin[1],
                "size": geometry.roi_size, "grid_size": geometry.crop_size,
                "pixel_spacing_mm": geometry.pixel_spacing_mm},
        "reference_slices_used": list(stacks.kept),
        "reference_slices_dropped": list(stacks.dropped),
        "output_slices_used": list(stacks.partners[output]),
        "matched_slices": stacks.partners,
        "match_distance_mm": stacks.distances_mm,
        "grids": [grid.to_dict() for grid in stacks.grids],
        "intensity_window": stacks.windows,
        "registration": result.registration,
        "volume_ml": group_volumes(labels, volume.spacing,
                                   {CLASS_NAMES[k]: (k,) for k in range(1, len(CLASS_NAMES))}),
        "group_volume_ml": groups,
        "burden_percent": burdens(groups),
        "config": config.to_dict(),
        "seconds": time.perf_counter() - start,
    }
    return Prediction(patient.case_id, volume, labels, native, record)


def output_paths(out: str | os.PathLike[str]) -> dict[str, Path]:
    """The label map ``out`` (``.nii`` or ``.nii.gz``), its JSON record and probability map."""
    out = Path(out)
    stem = next((out.name[: -len(s)] for s in _NIFTI_SUFFIXES if out.name.endswith(s)), None)
    if not stem:
        raise ValueError(f"{out}: the output must be a .nii.gz or .nii file")
    suffix = out.name[len(stem):]
    return {"labels": out, "record": out.with_name(f"{stem}.json"),
            "probabilities": out.with_name(f"{stem}_probabilities{suffix}")}


def write_prediction(prediction: Prediction, out: str | os.PathLike[str],
                     save_probabilities: bool = False) -> dict[str, Path]:
    """Write the label map on the output sequence's native grid (same shape and affine), the
    probability map (float32, ``[X, Y, Z, K]``) when asked for, and the JSON record.

    All of them are written to temporaries first and put in place only once every one is
    complete: a full disk or a crash leaves the previous outputs (and their record) untouched,
    never a mix of old and new.
    """
    paths = output_paths(out)
    affine = prediction.reference.affine
    arrays = {"labels": prediction.labels.transpose(2, 1, 0).astype(np.uint8)}
    if save_probabilities:
        arrays["probabilities"] = prediction.probabilities.transpose(3, 2, 0, 1).astype(
            np.float32)
    written = {key: paths[key] for key in arrays} | {"record": paths["record"]}
    with contextlib.ExitStack() as stack:
        # Entered in this order, renamed in reverse: the record lands first, then the maps;
        # nothing is renamed unless every temporary was written.
        temporaries = {key: stack.enter_context(atomic_path(paths[key])) for key in written}
        for key, array in arrays.items():
            nifti_image(array, affine).to_filename(str(temporaries[key]))
        temporaries["record"].write_text(json_text(prediction.record | {
            "outputs": {key: str(path) for key, path in written.items() if key != "record"}}))
    return written


def preprocess_config_for(payload: dict, overrides: dict[str, Any] | None = None
                          ) -> tuple[PreprocessConfig, str]:
    """The preprocessing geometry a checkpoint's model was trained on, and where it came from.

    Checkpoints carry it (``preprocess``); older ones do not, and then the training data's
    manifests are read, when that folder is still there. Otherwise the defaults, which are the
    seed's. ``overrides`` (command-line values, ``None`` meaning unset) win over all.
    """
    recorded, source = payload.get("preprocess"), "checkpoint"
    root = (payload.get("train_config") or {}).get("root_path")
    if not isinstance(recorded, dict) and root:
        layout = ProcessedLayout(Path(root))
        recorded, source = layout.recorded_preprocessing(), str(layout.manifest_dir())
    if not isinstance(recorded, dict):
        recorded, source = {}, "defaults"
    values: dict[str, Any] = {name: recorded[name] for name in GEOMETRY_FIELDS
                              if name in recorded}
    values |= {name: value for name, value in (overrides or {}).items() if value is not None}
    unknown = sorted(set(values) - set(GEOMETRY_FIELDS))
    if unknown:
        raise ValueError(f"unknown preprocessing setting(s) {unknown}")
    default = PreprocessConfig()
    if "pixel_spacing_mm" in values:
        values["affine"] = dataclasses.replace(default.affine,
                                               pixel_spacing_mm=values["pixel_spacing_mm"])
    return dataclasses.replace(default, **values), source


def registration_networks(payload: dict, preprocess: PreprocessConfig, device: torch.device,
                          segmenter: str | os.PathLike[str] | None = None) -> Registration:
    """The networks the training data's registration used, for the same step at prediction.

    The non-rigid network is the training root's ``voxelmorph.pth`` when its SHA-256 is the one
    the training manifests record; otherwise the step is skipped with a warning (the affine step
    still runs). ``affine_metric="segmentation"`` needs ``segmenter`` (a checkpoint).
    """
    voxelmorph = None
    if preprocess.nonrigid_registration:
        root = (payload.get("train_config") or {}).get("root_path")
        path = Path(root) / VOXELMORPH_CHECKPOINT if root else None
        recorded = ProcessedLayout(Path(root)).recorded_voxelmorph() if root else None
        if path is None or not path.is_file():
            log.warning("the training data were registered non-rigidly but %s is not here: the "
                        "non-rigid step is skipped", path or "their voxelmorph.pth")
        elif recorded is not None and recorded != file_sha256(path):
            log.warning("%s is not the non-rigid network the training data went through "
                        "(SHA-256 differs from the manifests'): the non-rigid step is skipped",
                        path)
        else:
            from preprocessing.voxelmorph import load_voxelmorph

            voxelmorph = load_voxelmorph(path, device)
    network = None
    if preprocess.affine_registration and preprocess.affine_metric == "segmentation":
        if segmenter is None:
            raise ValueError("the training data were registered with affine_metric "
                             "'segmentation': pass --segmenter CHECKPOINT (or --register off)")
        network = cached_segmenter(str(segmenter), str(device))
    return Registration(voxelmorph=voxelmorph, segmenter=network)
