"""Checkpoint loading and held-out evaluation shared by test.py (and later by validation)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from datasets.dataset import iter_test_volumes
from datasets.processed import ProcessedLayout
from datasets.raw import nifti_image
from evaluation.inference import predict_volume
from evaluation.metrics import MetricAccumulator
from networks.variants import input_size, network_from_record
from utils import atomic_path, read_checkpoint

log = logging.getLogger(__name__)

_REQUIRED_KEYS = ("network", "model")


@dataclass(frozen=True)
class LoadedCheckpoint:
    model: nn.Module
    payload: dict

    @property
    def img_size(self) -> int:
        return input_size(self.model)


def load_checkpoint(path: str | Path, device: torch.device) -> LoadedCheckpoint:
    """Rebuild the network described inside a checkpoint and load its weights (eval mode)."""
    path = Path(path)
    payload = read_checkpoint(path)
    if "network" not in payload and {"model_name", "model_config"} <= set(payload):
        # Written before variants existed: always an early-fusion TransUNet.
        payload["network"] = {"variant": "transunet", "name": payload["model_name"],
                              "config": payload["model_config"]}
    missing = [key for key in _REQUIRED_KEYS if key not in payload]
    if missing:
        raise ValueError(f"{path}: not a checkpoint of this framework (missing {missing})")
    try:
        model = network_from_record(payload["network"], payload["model"])
    except (ValueError, KeyError, RuntimeError) as error:
        raise ValueError(f"{path}: cannot rebuild its network ({error})") from error
    return LoadedCheckpoint(model.to(device).eval(), payload)


def evaluate(model: nn.Module, layout: ProcessedLayout, names: list[str], img_size: int,
             device: torch.device, *, batch_size: int = 32,
             prediction_dir: Path | None = None) -> MetricAccumulator:
    """Predict every listed test volume, score it, optionally write NIfTI predictions."""
    metrics = MetricAccumulator()
    model.eval()
    for volume in tqdm(iter_test_volumes(layout, names), total=len(names), desc="test",
                       unit="volume"):
        prediction = predict_volume(model, volume.image, img_size, device, batch_size)
        metrics.update(volume.name, prediction, volume.label, volume.spacing)
        if prediction_dir is not None:
            write_nifti(prediction_dir / f"{volume.name}_pred.nii.gz", prediction, volume.spacing)
            write_nifti(prediction_dir / f"{volume.name}_gt.nii.gz", volume.label, volume.spacing)
    return metrics


def write_nifti(path: Path, volume: np.ndarray, spacing: tuple[float, float, float]) -> None:
    """Write a ``[D, H, W]`` array as NIfTI with the given (slice, row, column) spacing."""
    affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    image = nifti_image(volume.transpose(2, 1, 0), affine)
    with atomic_path(path) as tmp:
        image.to_filename(str(tmp))
