"""Training for misaligned sequences: bSSFP and T2w moved independently of LGE and the label.

Registration of real bSSFP/T2w onto LGE leaves 2 mm and more (docs/registration.md), and at test
time a new patient's sequences arrive as misaligned as the scanner left them. A network that has
only seen perfectly registered training slices reads a few millimetres of offset as anatomy.
Here each moving sequence of a training slice is, with probability ``probability``, warped by its
own draw of the breath-hold misalignment model of :mod:`datasets.misalignment` (a similarity
about the slice centre, where the training ROI puts the heart, plus a smooth B-spline field);
LGE, which the label is drawn on, and the label stay where they are. The network thus learns to
read scar and edema across a few millimetres of offset between sequences.

The draws come from the caller's generator (a function of seed, epoch and slice index in
:class:`datasets.dataset.SliceDataset`), so runs stay reproducible and resumable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from datasets.labels import MODALITIES
from datasets.misalignment import MisalignmentConfig, sample_slice_misalignment, warp_slice

#: The test-time warp model of the misalignment benchmark: rotation up to 8 degrees, shift up
#: to 5 mm, scale within 5 %, a smooth field of up to 1.5 mm.
JITTER_MISALIGNMENT = MisalignmentConfig(max_rotation_deg=8.0, max_translation_mm=5.0,
                                         max_scale=0.05, nonrigid_mm=1.5)


@dataclass(frozen=True)
class JitterConfig:
    """``probability`` that each moving sequence of a slice is warped; the warp magnitudes; the
    pixel size of the training slices (the processed layout's 1 mm)."""

    probability: float = 0.5
    misalignment: MisalignmentConfig = field(default_factory=lambda: JITTER_MISALIGNMENT)
    pixel_spacing_mm: float = 1.0
    fixed: str = "LGE"

    def __post_init__(self) -> None:
        if isinstance(self.probability, bool) or not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {self.probability!r}")
        if not self.pixel_spacing_mm > 0:
            raise ValueError(f"pixel_spacing_mm must be > 0, got {self.pixel_spacing_mm}")
        if self.fixed not in MODALITIES:
            raise ValueError(f"fixed must be one of {MODALITIES}, got {self.fixed!r}")


def jitter_sequences(image: np.ndarray, config: JitterConfig, rng: np.random.Generator,
                     names: Sequence[str] = MODALITIES
                     ) -> tuple[np.ndarray, dict[str, dict[str, Any]]]:
    """``image [S, H, W]`` in [0, 1] with the moving sequences warped; the records drawn.

    ``records[name]`` is the :mod:`datasets.misalignment` record of each warped sequence (its
    sampling map in mm on the slice, origin at pixel (0, 0)). Values stay in [0, 1].
    """
    if image.ndim != 3 or len(image) != len(names):
        raise ValueError(f"expected image [{len(names)}, H, W], got {image.shape}")
    spacing = config.pixel_spacing_mm
    height, width = image.shape[1:]
    xs, ys = np.arange(width) * spacing, np.arange(height) * spacing
    centre = ((width - 1) / 2 * spacing, (height - 1) / 2 * spacing)
    out = np.array(image, dtype=np.float32)
    records: dict[str, dict[str, Any]] = {}
    for channel, name in enumerate(names):
        if name == config.fixed or rng.random() >= config.probability:
            continue
        record, _ = sample_slice_misalignment(rng, centre, xs, ys, config.misalignment)
        warped = warp_slice(out[channel], (spacing, spacing), record, is_label=False)
        out[channel] = np.clip(warped, 0.0, 1.0)
        records[name] = record
    return out, records
