"""Phantom cases with known labels, shared by the prediction tests (written once per session)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from datasets.phantom import case_paths, write_phantom_dataset
from datasets.raw import nifti_image

CASE = "case0001"
#: LGE columns cut from the side away from the heart: moves the LGE grid centre about 18 mm
#: further from the heart (the phantom's heart already sits about 20 mm off it).
DROP_COLUMNS = 40


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantom")
    write_phantom_dataset(root, 1, seed=5)
    return root


@pytest.fixture(scope="session")
def phantom_files(phantom_root) -> dict[str, Path]:
    """Sequence, label and per-sequence truth files of the phantom case."""
    return case_paths(phantom_root, CASE)


@pytest.fixture(scope="session")
def off_centre_files(phantom_files, tmp_path_factory) -> dict[str, Path]:
    """The case with the LGE field of view (and its label) cut short on the high-x side."""
    out = tmp_path_factory.mktemp("off_centre")
    files = dict(phantom_files)
    for key in ("LGE", "label"):
        image = nib.load(str(phantom_files[key]))
        cropped = np.asanyarray(image.dataobj)[:-DROP_COLUMNS]
        files[key] = out / f"{key}.nii.gz"
        nib.save(nifti_image(np.ascontiguousarray(cropped), image.affine), str(files[key]))
    return files
