"""Optional affine registration of the other sequences onto the reference, guided by a prediction.

Training data were registered (step 3 of :mod:`preprocessing.pipeline`) with a metric restricted
to the dilated *labelled* myocardium. A new patient has no label, so the first-pass prediction's
myocardium stands in for it: the mask only has to say where the heart is (it is dilated by
``mask_margin_mm`` anyway), which a rough prediction does. The registered ROI is then predicted
again. The fit is the one preprocessing used (``affine_metric``: NGF or Mattes MI) with the same
plausibility bounds, so an implausible fit falls back to the identity rather than making the
input worse.
"""

from __future__ import annotations

import numpy as np

from datasets.labels import MODALITIES
from prediction.inputs import PatientImages
from prediction.resampling import GridStacks, resample_through_fields
from preprocessing.affine_registration import myocardium_metric_mask, register_affine
from preprocessing.ngf_affine import register_affine_ngf
from preprocessing.pipeline import PreprocessConfig
from preprocessing.transforms import identity_field


def register_roi(patient: PatientImages, stacks: GridStacks, roi_labels: np.ndarray,
                 origin: tuple[int, int], config: PreprocessConfig
                 ) -> tuple[np.ndarray, dict[str, list[dict]]]:
    """ROI stack ``[D, S, roi, roi]`` with every non-reference sequence registered.

    ``roi_labels [D, roi, roi]`` is the first-pass prediction at ``origin`` on the crop grid.
    Returns the images (in [0, 255], each sequence through its own intensity window) and, per
    registered sequence, the per-slice fit records of the preprocessing manifest.
    """
    depth, size = len(stacks.grids), config.roi_size
    if roi_labels.shape != (depth, size, size):
        raise ValueError(f"roi_labels must be [{depth}, {size}, {size}], got {roi_labels.shape}")
    row0, col0 = origin
    crop = np.zeros((depth, config.crop_size, config.crop_size), dtype=np.uint8)
    crop[:, row0:row0 + size, col0:col0 + size] = roi_labels
    masks = np.stack([myocardium_metric_mask(label, config.affine.mask_margin_mm,
                                             config.pixel_spacing_mm) for label in crop])
    roi_field = identity_field((size, size)) + np.array([row0, col0], np.float64)[:, None, None]
    fixed = MODALITIES.index(stacks.reference)
    images = stacks.roi(origin, size)
    records: dict[str, list[dict]] = {}
    for name in stacks.present:
        if name == stacks.reference:
            continue
        channel = MODALITIES.index(name)
        if config.affine_metric == "ngf":
            results = register_affine_ngf(stacks.images[:, fixed], stacks.images[:, channel],
                                          masks, config.ngf, config.affine)
        else:
            results = [register_affine(stacks.images[i, fixed], stacks.images[i, channel],
                                       masks[i], config.affine) for i in range(depth)]
        fields = [result.transform.map_field(roi_field) for result in results]
        images[:, channel] = resample_through_fields(patient, stacks, name, fields)
        records[name] = [result.to_dict() for result in results]
    return images, records
