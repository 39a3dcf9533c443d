"""Label conventions shared by every part of the framework.

Training labels are 0 background, 1 normal myocardium, 2 scar, 3 edema. The MyoPS 2020 ground
truth uses scanner-style codes (200, 500, 600, 1220, 2221); blood pools are not a training class.
What a label map measures (group volumes in mL, burdens in % of the myocardium) is defined here
too, so predict.py's record and test.py's scores count the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

BACKGROUND, NORMAL_MYOCARDIUM, SCAR, EDEMA = 0, 1, 2, 3
NUM_CLASSES = 4
CLASS_NAMES: tuple[str, ...] = ("background", "myocardium", "scar", "edema")

#: Sequence names in the fixed channel order used everywhere (early-fusion channels, encoders).
MODALITIES: tuple[str, ...] = ("bSSFP", "LGE", "T2w")

#: Reported evaluation groups: name -> label values that form the group's foreground.
#: MyoPS 2020 reports "scar" and "scar+edema" (its edema includes the scar); our edema class is
#: edema without scar, reported as "edema alone" so it is never mistaken for MyoPS's edema.
EVAL_GROUPS: Mapping[str, tuple[int, ...]] = {
    "myocardium": (NORMAL_MYOCARDIUM,),
    "scar": (SCAR,),
    "edema alone": (EDEMA,),
    "scar+edema": (SCAR, EDEMA),
    "whole myocardium": (NORMAL_MYOCARDIUM, SCAR, EDEMA),
}
#: The two groups the MyoPS 2020 challenge ranks by.
MYOPS_GROUPS: tuple[str, ...] = ("scar", "scar+edema")

#: Burdens, in % of the whole myocardium (normal + scar + edema): name -> (part, whole), both
#: names of :data:`EVAL_GROUPS`. MyoPS 2020's edema includes the scar, so the second is the share
#: of the myocardium that is oedematous or scarred.
BURDENS: Mapping[str, tuple[str, str]] = {
    "scar burden": ("scar", "whole myocardium"),
    "scar+edema burden": ("scar+edema", "whole myocardium"),
}

#: MyoPS 2020 ground-truth codes -> training labels (LV and RV blood pools become background).
MYOPS2020_CODES: Mapping[int, int] = {
    0: BACKGROUND,
    200: NORMAL_MYOCARDIUM,
    500: BACKGROUND,
    600: BACKGROUND,
    1220: EDEMA,
    2221: SCAR,
}


def to_training_labels(raw: np.ndarray, source: str = "<array>") -> np.ndarray:
    """Map a raw label volume to training labels (uint8).

    Volumes already in 0..3 pass through; volumes in MyoPS 2020 codes are mapped. Any other value is
    an error naming ``source`` and the offending values, because silently dropping a class would
    corrupt training.
    """
    values = np.unique(raw)
    if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
        raise ValueError(f"{source}: label volume holds non-integer values")
    values = values.astype(np.int64)
    if set(values.tolist()) <= set(range(NUM_CLASSES)):
        return raw.astype(np.uint8)
    unknown = sorted(set(values.tolist()) - set(MYOPS2020_CODES))
    if unknown:
        raise ValueError(
            f"{source}: unknown label values {unknown}; expected 0..{NUM_CLASSES - 1} or "
            "MyoPS 2020 "
            f"codes {sorted(MYOPS2020_CODES)}"
        )
    lut = np.zeros(max(MYOPS2020_CODES) + 1, dtype=np.uint8)
    for code, label in MYOPS2020_CODES.items():
        lut[code] = label
    return lut[raw.astype(np.int64)]


def voxel_ml(spacing: Sequence[float]) -> float:
    """Volume of one voxel in mL (spacing in mm)."""
    values = [float(s) for s in spacing]
    if not values or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing must hold finite positive values, got {tuple(spacing)}")
    return float(np.prod(values)) / 1000.0


def group_volumes(labels: np.ndarray, spacing: Sequence[float],
                  groups: Mapping[str, Sequence[int]]) -> dict[str, float]:
    """mL of each group in a label map (a group is the union of its labels)."""
    if labels.ndim != len(spacing):
        raise ValueError(f"spacing {tuple(spacing)} does not match a {labels.ndim}-D label map")
    unit = voxel_ml(spacing)
    return {name: int(np.count_nonzero(np.isin(labels, tuple(codes)))) * unit
            for name, codes in groups.items()}


def burdens(volumes: Mapping[str, float]) -> dict[str, float | None]:
    """Each burden of :data:`BURDENS` whose groups ``volumes`` holds, in % (None: no myocardium)."""
    result: dict[str, float | None] = {}
    for name, (part, whole) in BURDENS.items():
        if part in volumes and whole in volumes:
            result[name] = 100.0 * volumes[part] / volumes[whole] if volumes[whole] > 0 else None
    return result
