"""Readers for raw multi-sequence CMR cases in the two layouts the framework accepts.

* MyoPS380 (the paper's layout): ``Raw_data/{bSSFP,LGE,T2w}/caseXXXX.nii.gz`` and
  ``Raw_data/label/caseXXXX_gt.nii.gz``.
* MyoPS 2020: ``CaseXXXX/CaseXXXX_{C0,LGE,T2,gd}.nii.gz`` (C0 is the bSSFP cine frame).

Volumes are held as ``[Z, Y, X]`` float32 arrays (slices first, as every later stage iterates
over slices) together with the NIfTI affine, which keeps nibabel's ``(i, j, k) = (x, y, z)`` voxel
index order. Nothing is read until :func:`load_case` is called, so discovering hundreds of cases is
cheap and errors about the folder structure come before any heavy work.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from datasets.labels import MODALITIES, to_training_labels

#: Where the release keeps the raw MyoPS380 cases (preprocess_data.py's default input).
DEFAULT_RAW_ROOT = "MyoPS380_dataset/Raw_data"
LAYOUTS = ("myops380", "myops2020")

_MYOPS2020_SUFFIX = {"bSSFP": "C0", "LGE": "LGE", "T2w": "T2", "label": "gd"}
_NIFTI_SUFFIXES = (".nii.gz", ".nii")


class RawDataError(ValueError):
    """A raw file or folder is missing, unreadable or inconsistent (message names the file)."""


@dataclass(frozen=True)
class Volume:
    """One 3D image (or label) with its geometry.

    ``array`` is ``[Z, Y, X]``; ``affine`` maps nibabel voxel indices ``(x, y, z, 1)`` to world
    millimetres, exactly as stored in the file.
    """

    array: np.ndarray
    affine: np.ndarray
    source: Path

    @property
    def num_slices(self) -> int:
        return int(self.array.shape[0])

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm ordered like ``array``: (slice, row, column)."""
        x, y, z = np.linalg.norm(self.affine[:3, :3], axis=0)
        return float(z), float(y), float(x)

    @property
    def slice_normal(self) -> np.ndarray:
        """Unit vector along increasing slice index in world space."""
        axis = self.affine[:3, 2]
        return axis / np.linalg.norm(axis)

    def slice_centres(self) -> np.ndarray:
        """World position (mm) of the centre of every slice, ``[Z, 3]``."""
        nz, ny, nx = self.array.shape
        index = np.stack(
            [np.full(nz, (nx - 1) / 2), np.full(nz, (ny - 1) / 2), np.arange(nz), np.ones(nz)]
        )
        return (self.affine @ index)[:3].T

    def same_geometry(self, other: Volume, tol_mm: float = 1e-3) -> bool:
        """True when both volumes sample exactly the same world grid."""
        return self.array.shape == other.array.shape and bool(
            np.allclose(self.affine, other.affine, atol=tol_mm)
        )


@dataclass(frozen=True)
class CaseFiles:
    """Where one case's files are; cheap to create, validated for existence."""

    case_id: str
    images: dict[str, Path]
    label: Path | None


@dataclass(frozen=True)
class RawCase:
    """A loaded case: one volume per sequence plus the label in training values (0..3).

    ``label_modality`` names the sequence whose grid the label was drawn on.
    """

    case_id: str
    images: dict[str, Volume]
    label: Volume | None
    label_modality: str | None


def read_volume(path: str | Path, *, is_label: bool = False, frame: int | None = None) -> Volume:
    """Read a 3D NIfTI volume, refusing anything a later stage would silently mishandle.

    ``frame`` picks one frame (0-based) of a 4D series, such as a cine exported by dcm2niix
    (its fourth axis is time); only that frame is read. A 4D series of several frames without
    ``frame`` is refused, and so is a ``frame`` the file does not have (a 3D volume is one
    frame, 0).
    """
    path = Path(path)
    if not path.is_file():
        raise RawDataError(f"{path}: file not found")
    try:
        image = nib.load(str(path))
        shape = image.shape
        if len(shape) == 4:
            frames = shape[3]
            if frame is None and frames > 1:
                hint = "" if is_label else (" (a cine? predict.py --cine_frame takes one "
                                            "frame of the bSSFP)")
                raise RawDataError(f"{path}: expected a 3D volume, got shape {shape}, a "
                                   f"series of {frames} frames{hint}")
            index = 0 if frame is None else frame
            if not 0 <= index < frames:
                raise RawDataError(f"{path}: has frames 0 to {frames - 1}, frame {frame} asked")
            data = np.asanyarray(image.dataobj[..., index])
        else:
            if frame not in (None, 0):
                raise RawDataError(f"{path}: a single frame (shape {shape}), frame {frame} "
                                   f"asked")
            data = np.asanyarray(image.dataobj)
    except RawDataError:
        raise
    except Exception as error:  # nibabel raises many types for corrupt files
        raise RawDataError(f"{path}: unreadable NIfTI ({error})") from error
    if data.ndim != 3:
        raise RawDataError(f"{path}: expected a 3D volume, got shape {data.shape}")
    if min(data.shape) < 1:
        raise RawDataError(f"{path}: empty volume of shape {data.shape}")
    array = np.ascontiguousarray(np.transpose(data, (2, 1, 0)))
    if not is_label:
        array = array.astype(np.float32, copy=False)
        if not np.all(np.isfinite(array)):
            bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
            raise RawDataError(f"{path}: {bad} NaN/Inf voxels")
    else:
        array = to_training_labels(array, source=str(path))
    affine = np.asarray(image.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise RawDataError(f"{path}: degenerate affine")
    return Volume(array=array, affine=affine, source=path)


def nifti_image(xyz: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """A NIfTI image of an ``[X, Y, Z]`` array with both qform and sform set to ``affine`` (mm).

    Viewers such as ITK-SNAP then place it in the same world space as the scanner images.
    """
    image = nib.Nifti1Image(np.ascontiguousarray(xyz), affine)
    image.header.set_data_dtype(xyz.dtype)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    return image


def detect_layout(root: str | Path) -> str:
    """Tell which raw layout ``root`` holds; accepts the dataset root or its ``Raw_data``."""
    root = Path(root)
    if not root.is_dir():
        raise RawDataError(f"{root}: raw data folder not found (the MyoPS380 layout is "
                           "Raw_data/{bSSFP,LGE,T2w,label}/; pass its place with --raw_root)")
    if _myops380_dir(root) is not None:
        return "myops380"
    if any(next(root.glob(f"{folder}*_{sequence}.nii*"), None) is not None
           for folder in ("*/", "") for sequence in ("C0", "LGE", "T2")):
        return "myops2020"
    raise RawDataError(
        f"{root}: neither the MyoPS380 layout (Raw_data/{{bSSFP,LGE,T2w,label}}) nor the "
        "MyoPS 2020 layout (CaseXXXX/CaseXXXX_{C0,LGE,T2,gd}.nii.gz)"
    )


def discover_cases(root: str | Path, layout: str | None = None, require_label: bool = True,
                   required: Sequence[str] = MODALITIES) -> list[CaseFiles]:
    """List every case under ``root`` with its files, sorted by case id.

    Raises :class:`RawDataError` for a ``required`` sequence missing from a case or a label
    without images, so that a broken export is caught before hours of processing. Sequences not
    required are listed when present (prediction reads any subset).
    """
    root = Path(root)
    layout = layout or detect_layout(root)
    if layout == "myops380":
        cases = _discover_myops380(root, required)
    elif layout == "myops2020":
        cases = _discover_myops2020(root, required)
    else:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if not cases:
        raise RawDataError(f"{root}: no cases found ({layout} layout)")
    if require_label:
        unlabelled = [case.case_id for case in cases if case.label is None]
        if unlabelled:
            raise RawDataError(f"{root}: cases without a label file: {', '.join(unlabelled)}")
    return cases


def load_case(files: CaseFiles) -> RawCase:
    """Read a case's volumes; the label must share the grid of one of its sequences."""
    images = {name: read_volume(path) for name, path in files.images.items()}
    if files.label is None:
        return RawCase(files.case_id, images, None, None)
    label = read_volume(files.label, is_label=True)
    # Prefer LGE when several sequences share the label's grid (MyoPS 2020 is pre-aligned).
    order = sorted(images, key=lambda name: name != "LGE")
    owner = next((name for name in order if images[name].same_geometry(label)), None)
    if owner is None:
        shapes = {name: volume.array.shape for name, volume in images.items()}
        raise RawDataError(
            f"{files.label}: label grid {label.array.shape} matches no sequence of case "
            f"{files.case_id} (shapes {shapes}, or the affines differ)"
        )
    return RawCase(files.case_id, images, label, owner)


def _myops380_dir(root: Path) -> Path | None:
    for candidate in (root / "Raw_data", root):
        if all((candidate / name).is_dir() for name in MODALITIES):
            return candidate
    return None


def _nifti_stem(path: Path) -> str | None:
    for suffix in _NIFTI_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return None


def _nifti_files(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            stem = _nifti_stem(path)
            if stem is not None and not path.name.startswith("."):
                found[stem] = path
    return found


def _discover_myops380(root: Path, required: Sequence[str]) -> list[CaseFiles]:
    base = _myops380_dir(root)
    assert base is not None
    per_modality = {name: _nifti_files(base / name) for name in MODALITIES}
    labels = {
        stem.removesuffix("_gt"): path
        for stem, path in _nifti_files(base / "label").items()
        if stem.endswith("_gt")
    }
    case_ids = sorted(set().union(*per_modality.values()))
    for case_id in case_ids:
        missing = [name for name in required if case_id not in per_modality[name]]
        if missing:
            raise RawDataError(
                f"{base}: case {case_id} lacks {', '.join(missing)} "
                f"(expected {base}/{missing[0]}/{case_id}.nii.gz)"
            )
    orphans = sorted(set(labels) - set(case_ids))
    if orphans:
        raise RawDataError(f"{base / 'label'}: labels without images: {', '.join(orphans)}")
    return [
        CaseFiles(case_id, {name: per_modality[name][case_id] for name in MODALITIES
                            if case_id in per_modality[name]}, labels.get(case_id))
        for case_id in case_ids
    ]


def _discover_myops2020(root: Path, required: Sequence[str]) -> list[CaseFiles]:
    pattern = re.compile(r"^(?P<case>.+)_(?P<seq>C0|LGE|T2|gd)$")
    grouped: dict[str, dict[str, Path]] = {}
    for path in sorted([*root.glob("*.nii*"), *root.glob("*/*.nii*")]):
        stem = _nifti_stem(path)
        match = pattern.match(stem) if stem else None
        if match:
            grouped.setdefault(match["case"], {})[match["seq"]] = path
    cases = []
    for case_id, found in sorted(grouped.items()):
        missing = [_MYOPS2020_SUFFIX[name] for name in required
                   if _MYOPS2020_SUFFIX[name] not in found]
        if missing:
            where = found[next(iter(found))].parent
            names = ", ".join(f"{case_id}_{s}.nii.gz" for s in missing)
            raise RawDataError(f"{where}: case {case_id} lacks {names}")
        images = {name: found[_MYOPS2020_SUFFIX[name]] for name in MODALITIES
                  if _MYOPS2020_SUFFIX[name] in found}
        cases.append(CaseFiles(case_id, images, found.get("gd")))
    return cases
