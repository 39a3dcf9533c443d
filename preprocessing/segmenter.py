"""The network behind segmentation-guided registration: one sequence in, its myocardium out.

The network must segment each moving sequence on its own: an I_MMSeg variant (or an early-fusion
TransUNet) trained with ``--sequence_dropout``, so that the other channels zeroed (and masked)
are inputs it has seen. A ``transunet_single`` model reads one sequence only and cannot serve
both moving sequences. Its myocardium probability (normal + scar + edema) is what
:mod:`preprocessing.mask_affine` registers onto the label.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch

from datasets.labels import MODALITIES
from networks.checkpoint import load_checkpoint
from networks.inference import window_probabilities
from networks.sequences import check_model_inputs


class CheckpointSegmenter:
    """``segmenter(stack, sequence)``: ``[D, H, W]`` in [0, 255] -> myocardium ``[D, H, W]``.

    ``tta`` averages the four flips (see :func:`networks.inference.predict_probabilities`).
    """

    def __init__(self, checkpoint: str | os.PathLike[str], device: torch.device,
                 tta: bool = True) -> None:
        self.checkpoint = Path(checkpoint)
        self.device = device
        self.tta = tta
        self.loaded = load_checkpoint(self.checkpoint, device)
        network = self.loaded.payload["network"]
        dropout = (self.loaded.payload.get("train_config") or {}).get("sequence_dropout", 0.0)
        if network.get("variant") == "transunet_single":
            raise ValueError(f"{self.checkpoint}: a transunet_single network reads one "
                             "sequence only; registration segments every moving sequence")
        if not dropout:
            raise ValueError(f"{self.checkpoint}: a {network.get('variant')} network trained "
                             "without --sequence_dropout has never seen one sequence alone; "
                             "train with --sequence_dropout")

    def __call__(self, stack: np.ndarray, sequence: str) -> np.ndarray:
        stack = np.asarray(stack, dtype=np.float32)
        if stack.ndim != 3:
            raise ValueError(f"expected a [D, H, W] stack of {sequence}, got {stack.shape}")
        if sequence not in MODALITIES:
            raise ValueError(f"unknown sequence {sequence!r}; known: {list(MODALITIES)}")
        try:
            check_model_inputs(self.loaded.model, (sequence,))
        except ValueError as error:
            raise ValueError(f"{self.checkpoint}: cannot segment {sequence} alone ({error})"
                             ) from error
        windows = np.zeros((stack.shape[0], len(MODALITIES), *stack.shape[1:]), np.float32)
        windows[:, MODALITIES.index(sequence)] = stack
        probabilities = window_probabilities(self.loaded.model, windows, (sequence,),
                                             self.loaded.img_size, self.device, tta=self.tta)
        return np.clip(probabilities[:, 1:].sum(axis=1), 0.0, 1.0)

    def describe(self) -> dict:
        network = self.loaded.payload["network"]
        return {"checkpoint": str(self.checkpoint), "variant": network.get("variant"),
                "name": network.get("name"), "tta": self.tta}


@functools.lru_cache(maxsize=2)
def cached_segmenter(checkpoint: str, device: str = "cpu") -> CheckpointSegmenter:
    """One segmenter per process and checkpoint: worker processes load it once, not per case."""
    return CheckpointSegmenter(checkpoint, torch.device(device))
