"""Label conventions shared by every part of the framework.

Training labels are 0 background, 1 normal myocardium, 2 scar, 3 edema. The MyoPS 2020 ground
truth uses scanner-style codes (200, 500, 600, 1220, 2221); blood pools are not a training class.
"""

from __future__ import annotations

from collections.abc import Mapping

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
