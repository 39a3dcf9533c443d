"""Our cases into an nnU-Net raw dataset, and nnU-Net's predictions back to our scorer.

Two sources can be exported, each with ``splits_final.json`` from :func:`datasets.folds.fold_cases`
so that nnU-Net's fold k holds out exactly the cases our fold k tests:

* **raw** (:func:`export_raw`): the raw NIfTI of MyoPS 2020 or MyoPS380, as a user would hand
  them to nnU-Net. nnU-Net needs every channel on one grid: each case's reference is chosen as
  our label-free path chooses it (:func:`preprocessing.slice_matching.choose_reference`: fewest
  slices, ties to LGE) and the other sequences are resampled onto it by world position
  (SimpleITK, linear). Predictions are mapped onto the raw label's grid (nearest) and scored in
  native space by :func:`evaluation.score_folder.score_folder`.
* **processed** (:func:`export_processed`): the test volumes of our processed layout. Ours are
  label-free crop grids (224 x 224 at 1 mm, made without the label; their manifests record the
  grids), so nnU-Net sees the same field of view as our networks' localisation does and trains
  several times faster than on whole images. Its class probabilities are mapped onto the labelled
  sequence's native voxels with :func:`prediction.native.probabilities_to_native`, exactly as
  test.py maps ours, and scored on both the grid and in native space. Volumes of the release's
  processed layout (ROI already cut) are scored on their grid and reported as "ROI given".

Every channel file is ``imagesTr/<case>_0000.nii.gz`` (bSSFP), ``_0001`` (LGE), ``_0002`` (T2w);
labels are ``labelsTr/<case>.nii.gz`` in our training values (0 background, 1 normal
myocardium, 2 scar, 3 edema). ``dataset.json`` records which source was exported, so scoring
needs only the work folder. A label is never read to make an input.

Scores are written as test.py writes them (``summary.json``, per-case CSV), so
``python -m bench.results_table`` puts nnU-Net in the same table as our runs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from datasets.folds import fold_cases
from datasets.labels import CLASS_NAMES, MODALITIES, to_training_labels
from datasets.processed import ProcessedLayout
from datasets.raw import CaseFiles, RawDataError, discover_cases, load_case
from evaluation.evaluate import Scores, write_native_nifti, write_results
from evaluation.score_folder import score_folder
from evaluation.test_cases import read_test_case
from prediction.native import labels_from_probabilities, probabilities_to_native
from preprocessing.slice_matching import choose_reference
from utils import atomic_path, write_json

log = logging.getLogger("baselines.nnunet")

DATASET_ID = 501
DATASET_NAME = "MyoPS"
#: nnU-Net's channel index of each sequence: _0000 bSSFP, _0001 LGE, _0002 T2w.
CHANNELS = {name: index for index, name in enumerate(MODALITIES)}
#: The key of dataset.json that records what was exported (nnU-Net ignores unknown keys).
SOURCE_KEY = "immseg_source"
SOURCES = ("raw", "processed")


def dataset_dir(work: str | Path) -> Path:
    return Path(work) / "nnUNet_raw" / f"Dataset{DATASET_ID:03d}_{DATASET_NAME}"


def _sitk():
    import SimpleITK as sitk

    return sitk


def _resampled(path: Path, reference: Any, label: bool) -> Any:
    """``path`` resampled onto ``reference``'s grid by world position (identity transform)."""
    sitk = _sitk()
    image = sitk.ReadImage(str(path), sitk.sitkUInt16 if label else sitk.sitkFloat32)
    if (image.GetSize() == reference.GetSize()
            and np.allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-3)
            and np.allclose(image.GetDirection(), reference.GetDirection(), atol=1e-6)
            and np.allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-6)):
        return image
    return sitk.Resample(image, reference, sitk.Transform(),
                         sitk.sitkNearestNeighbor if label else sitk.sitkLinear, 0.0,
                         image.GetPixelID())


def _write(image: Any, target: Path) -> None:
    with atomic_path(target) as tmp:
        _sitk().WriteImage(image, str(tmp), True)


def _folders(work: str | Path) -> tuple[Path, Path, Path]:
    target = dataset_dir(work)
    images, labels = target / "imagesTr", target / "labelsTr"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    return target, images, labels


def _write_dataset(target: Path, ids: Sequence[str], folds: int, source: dict) -> None:
    ids = sorted(ids)
    write_json(target / "dataset.json", {
        "channel_names": {str(CHANNELS[name]): name for name in MODALITIES},
        "labels": {name: index for index, name in enumerate(CLASS_NAMES)},
        "numTraining": len(ids),
        "file_ending": ".nii.gz",
        SOURCE_KEY: source,
    })
    write_json(target / "splits_final.json", splits(ids, folds))


def splits(case_ids: Sequence[str], folds: int) -> list[dict[str, list[str]]]:
    """nnU-Net's ``splits_final.json`` for our K folds: fold k trains on our fold k's training
    cases and holds out its test cases ("val")."""
    result = []
    for fold in range(folds):
        train, test = fold_cases(case_ids, folds, fold)
        result.append({"train": sorted(train), "val": sorted(test)})
    return result


# --------------------------------------------------------------------------------------------
# Export


def export_case(files: CaseFiles, images_dir: Path, labels_dir: Path | None) -> str:
    """Write one raw case's channels (and label) on its reference grid; returns the reference.

    The case is read with our readers first, so a bad file stops with its name.
    """
    sitk = _sitk()
    case = load_case(files)
    missing = [name for name in MODALITIES if name not in case.images]
    if missing:
        raise RawDataError(f"{files.case_id}: nnU-Net needs every sequence; missing {missing}")
    reference_name = choose_reference(case.images, prefer="LGE")
    reference = sitk.ReadImage(str(files.images[reference_name]), sitk.sitkFloat32)
    for name in MODALITIES:
        image = _resampled(files.images[name], reference, label=False)
        _write(image, images_dir / f"{files.case_id}_{CHANNELS[name]:04d}.nii.gz")
    if labels_dir is not None and case.label is not None:
        label = _resampled(files.label, reference, label=True)
        # Our training values (raw codes such as MyoPS 2020's 200/1220/2221 mapped), on the grid.
        values = sitk.GetArrayFromImage(label)
        mapped = sitk.GetImageFromArray(
            to_training_labels(values, source=str(files.label)).astype(np.uint8))
        mapped.CopyInformation(label)
        _write(sitk.Cast(mapped, sitk.sitkUInt8), labels_dir / f"{files.case_id}.nii.gz")
    return reference_name


def export_raw(raw_root: str | Path, work: str | Path, folds: int = 5,
               layout: str | None = None) -> Path:
    """Every labelled case of ``raw_root`` into the nnU-Net raw dataset under ``work``."""
    cases = [c for c in discover_cases(raw_root, layout) if c.label is not None]
    if len(cases) < folds:
        raise RawDataError(f"{raw_root}: {len(cases)} labelled cases for {folds} folds")
    target, images, labels = _folders(work)
    references = {}
    for files in cases:
        references[files.case_id] = export_case(files, images, labels)
        log.info("%s: exported on the %s grid", files.case_id, references[files.case_id])
    _write_dataset(target, list(references), folds, {
        "kind": "raw", "root": str(Path(raw_root).resolve()), "layout": layout,
        "references": references})
    return target


def _grid_image(array: np.ndarray, spacing: Sequence[float], pixel_type: int) -> Any:
    """A ``[D, H, W]`` array as a SimpleITK image with ``spacing`` (slice, row, column mm)."""
    sitk = _sitk()
    image = sitk.Cast(sitk.GetImageFromArray(np.ascontiguousarray(array)), pixel_type)
    image.SetSpacing([float(spacing[2]), float(spacing[1]), float(spacing[0])])
    return image


def export_processed(processed_root: str | Path, work: str | Path, folds: int = 5) -> Path:
    """Every test volume of our processed layout into the nnU-Net raw dataset under ``work``.

    The volumes are written as stored (our [0, 255] grid intensities; nnU-Net z-scores each
    channel itself) with their spacing; the label as stored, already on the grid.
    """
    sitk = _sitk()
    layout = ProcessedLayout(Path(processed_root))
    names = layout.scan("test_vol")
    if len(names) < folds:
        raise RawDataError(f"{processed_root}: {len(names)} test volumes for {folds} folds "
                           "(preprocess with every case as a test volume, e.g. --folds)")
    target, images, labels = _folders(work)
    for name in names:
        stored = layout.read_stored_volume(name)
        for index, sequence in enumerate(layout.modalities):
            _write(_grid_image(stored.images[:, index], stored.spacing, sitk.sitkFloat32),
                   images / f"{name}_{CHANNELS[sequence]:04d}.nii.gz")
        _write(_grid_image(stored.label.astype(np.uint8), stored.spacing, sitk.sitkUInt8),
               labels / f"{name}.nii.gz")
    _write_dataset(target, names, folds, {"kind": "processed",
                                          "root": str(Path(processed_root).resolve())})
    return target


def read_source(work: str | Path) -> dict:
    """What ``work`` holds an export of (``kind``, ``root``...), from its dataset.json."""
    path = dataset_dir(work) / "dataset.json"
    try:
        source = json.loads(path.read_text())[SOURCE_KEY]
        if source["kind"] not in SOURCES:
            raise ValueError(f"unknown kind {source['kind']!r}")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise RawDataError(f"{path}: not an export of ours ({error}); run "
                           "`python -m baselines.nnunet export` first") from error
    return source


# --------------------------------------------------------------------------------------------
# Predictions back to our scorer


def fold_predictions(work: str | Path) -> dict[str, Path]:
    """``case -> label map`` from every fold's ``validation`` folder under ``nnUNet_results``.

    A case predicted by two trainers' results is an error naming both, not a silent pick.
    """
    found: dict[str, Path] = {}
    for path in sorted(Path(work).glob("nnUNet_results/*/*/fold_*/validation/*.nii.gz")):
        case = path.name[:-len(".nii.gz")]
        if case in found:
            raise RawDataError(f"{case}: predicted twice ({found[case]} and {path}); keep one "
                               "trainer's results under nnUNet_results")
        found[case] = path
    return found


def read_splits(work: str | Path) -> list[dict[str, list[str]]]:
    """The export's ``splits_final.json``: per fold, its ``train`` and ``val`` cases."""
    return json.loads((dataset_dir(work) / "splits_final.json").read_text())


def held_out(splits: list[dict[str, list[str]]], folds: Sequence[int] | None
             ) -> list[str] | None:
    """The held-out cases of ``folds`` in ``splits`` (None: every case)."""
    if folds is None:
        return None
    return sorted(case for k in folds for case in splits[k]["val"])


def collect_raw_predictions(work: str | Path, raw_root: str | Path, out: str | Path,
                            layout: str | None = None) -> Path:
    """Every fold's predictions, mapped onto the raw label grids, into ``out`` (one map per
    case, ``<case>.nii.gz``), ready for :func:`evaluation.score_folder.score_folder`."""
    sitk = _sitk()
    found = fold_predictions(work)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for files in discover_cases(raw_root, layout):
        if files.label is None or files.case_id not in found:
            continue
        truth = sitk.ReadImage(str(files.label))
        mapped = _resampled(found[files.case_id], truth, label=True)
        _write(sitk.Cast(mapped, sitk.sitkUInt8), out / f"{files.case_id}.nii.gz")
    return out


def probabilities_of(prediction: Path, classes: int = len(CLASS_NAMES)) -> np.ndarray:
    """``[D, K, H, W]`` class probabilities of one nnU-Net prediction: its ``.npz`` when it
    saved them (``--save_probabilities``), else the one-hot of its label map."""
    npz = prediction.with_name(prediction.name[:-len(".nii.gz")] + ".npz")
    if npz.is_file():
        with np.load(npz) as data:
            probabilities = np.asarray(data["probabilities"], dtype=np.float32)  # [K, D, H, W]
        return np.ascontiguousarray(np.moveaxis(probabilities, 0, 1))
    labels = _sitk().GetArrayFromImage(_sitk().ReadImage(str(prediction)))
    return np.ascontiguousarray(
        np.moveaxis(np.eye(classes, dtype=np.float32)[labels.astype(np.int64)], -1, 1))


def score_processed(work: str | Path, processed_root: str | Path,
                    only: Sequence[str] | None = None) -> Scores:
    """Grid and native-space scores of every predicted test volume (or the ``only`` ones)."""
    found = fold_predictions(work)
    layout = ProcessedLayout(Path(processed_root))
    names = sorted(found) if only is None else list(only)
    missing = [name for name in names if name not in found]
    if missing:
        raise RawDataError(f"{work}: no nnU-Net prediction for {len(missing)} case(s): "
                           f"{', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}")
    out = Path(work) / "predictions"
    out.mkdir(parents=True, exist_ok=True)
    scores = Scores()
    for name in names:
        case = read_test_case(layout, name)
        probabilities = probabilities_of(found[name])
        if probabilities.shape[0] != case.label.shape[0] or \
                probabilities.shape[2:] != case.label.shape[1:]:
            raise RawDataError(f"{found[name]}: prediction {probabilities.shape} does not match "
                               f"the test volume {case.label.shape} of {name}")
        grid = labels_from_probabilities(probabilities)
        scores.grid.update(name, grid, case.label, case.spacing)
        if case.roi_given:
            scores.roi_given.append(name)
        elif case.native is not None:
            native = labels_from_probabilities(probabilities_to_native(
                probabilities, case.native.volume, case.native.slices, case.stacks.grids, (0, 0)))
            scores.native.update(name, native, case.native.label.array, case.native.spacing)
            write_native_nifti(out / f"{name}.nii.gz", native, case.native.volume)
    return scores


def score(work: str | Path, folds: Sequence[int] | None = None,
          output_dir: str | Path | None = None) -> Scores:
    """Out-of-fold scores of the export in ``work`` with our scorer, written as test.py writes
    them into ``output_dir`` (default ``<work>/test``): of every case, or of the held-out cases
    of ``folds`` (an error names the cases whose fold has not been predicted)."""
    source = read_source(work)
    splits = read_splits(work)
    only = held_out(splits, folds)
    output_dir = Path(output_dir or Path(work) / "test")
    output_dir.mkdir(parents=True, exist_ok=True)
    if source["kind"] == "processed":
        scores = score_processed(work, source["root"], only)
        obtained = (scores.describe() if scores.roi_given else
                    f"{scores.where}; label-free (nnU-Net on the whole crop grids of our "
                    "processed layout, made without the label)")
    else:
        folder = collect_raw_predictions(work, source["root"], Path(work) / "predictions",
                                         source.get("layout"))
        native = score_folder(folder, source["root"], source.get("layout"), only)
        scores = Scores(grid=native, native=native)
        obtained = ("native space (the raw label's grid and spacing); whole images, no ROI "
                    "(nnU-Net on the raw files)")
    evaluation = (f"out of fold over {len(splits)} folds" if folds is None else
                  f"out of fold, fold(s) {', '.join(map(str, folds))} of {len(splits)}")
    write_results(output_dir, scores, {"model": "nnU-Net v2 2d", "source": source,
                                       "folds": list(folds) if folds is not None else "all",
                                       "evaluation": evaluation},
                  title="nnU-Net", obtained=obtained)
    return scores
