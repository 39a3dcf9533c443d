"""Run the pipeline over a raw dataset and pack the result into the seed layout.

Every labelled case is written in two forms, so that any case can train in one fold and be
tested in another:

* *training slices* (``train_npz``): the five steps, registration and the 128 ROI guided by the
  label, as the seed does; a training label may shape training inputs;
* a *test volume* (``test_vol_h5``): steps 1-2 only, on the whole crop grid, made without
  reading the label (:func:`preprocessing.pipeline.grid_stacks`, the function prediction uses
  for a new patient); the label is resampled onto the same grids beside it, for scoring only.
  Heart localisation, registration and the ROI are then the prediction path's job, at test time.

The lists decide which form a case plays: ``lists/{train,test_vol}.txt`` follow the release's
split (sorted cases ``[0::test_every]`` are tested) and ``lists/cv<K>/fold<k>/`` the K folds of
:mod:`datasets.folds`.

Three stages: (1) every case is matched, resampled, affinely registered and cropped, in parallel
processes, the result parked in ``<out>/.work``; (2) the non-rigid network is trained on the
aligned pairs of the training cases, unless its checkpoint exists and was trained with the same
settings (then it is reused); (3) every case gets its non-rigid fields and is resampled once more
from the native images and written. A case counts as done once its manifest exists (written
last, atomically) and records the same settings and non-rigid network, so reruns skip finished
work, an interrupted run restarts safely, and a run with other settings does them again.
"""

from __future__ import annotations

import json
import logging
import pickle
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from datasets.folds import fold_cases, fold_list_dir, release_test_cases
from datasets.labels import MODALITIES
from datasets.missing import DATASET_MISSING_FILE, MissingSequences
from datasets.processed import ProcessedLayout, write_test_volume, write_training_slice
from datasets.raw import LAYOUTS, CaseFiles, RawCase, discover_cases, load_case
from preprocessing.grid_stacks import GridStacks
from preprocessing.pipeline import (
    AlignedCase,
    NoMyocardiumError,
    PreprocessConfig,
    ProcessedCase,
    align_case,
    finish_case,
    grid_stacks,
)
from preprocessing.qa import write_qa_png
from preprocessing.segmenter import cached_segmenter
from preprocessing.voxelmorph import checkpoint_provenance, load_voxelmorph, train_voxelmorph
from preprocessing.voxelmorph_net import VoxelMorphConfig
from utils import atomic_path, file_sha256, setting, write_json, write_text

log = logging.getLogger(__name__)

VOXELMORPH_CHECKPOINT = "voxelmorph.pth"
#: Version of what a case's files hold; manifests of another version are redone. 2: every case
#: in both forms, test volumes label-free on the crop grid.
CASE_FORMAT = 2


@dataclass(frozen=True)
class CaseResult:
    """``num_slices`` is the count of training slices, 0 for a case written as a test volume
    only (its label has no myocardium on the matched slices)."""

    case_id: str
    split: str
    num_slices: int
    seconds: float
    skipped: bool


@dataclass
class RunOptions:
    """How a run is carried out (not what the data become: that is :class:`PreprocessConfig`)."""

    test_every: int = setting(5, "the release's split: sorted cases [0::N] are listed as test "
                              "volumes (case0001, case0006, ... for 5); 0 = none")
    folds: int = setting(5, "also write the lists of K-fold cross-validation (lists/cv<K>/"
                         "fold<k>/, round-robin on sorted cases; 0 = none). Every case is written "
                         "both as training slices and as a label-free test volume")
    workers: int = setting(1, "parallel processes")
    overwrite: bool = setting(False, "redo finished cases")
    layout: str | None = setting(None, "raw layout", choices=LAYOUTS, shown="detected")
    allow_missing: bool = setting(
        False, "accept cases that lack a sequence: its channel is written as zeros and the case "
        "is listed in <out_root>/missing.json, which train.py applies")
    qa: bool = setting(True, "skip the QA pictures", flag="no_qa")
    voxelmorph: VoxelMorphConfig = field(default_factory=VoxelMorphConfig,
                                         metadata={"cli": False})
    voxelmorph_checkpoint: Path | None = setting(
        None, "non-rigid model to reuse or to train into", shown="<out_root>/voxelmorph.pth")
    segmenter_checkpoint: Path | None = setting(
        None, "checkpoint of a network that segments one sequence alone (trained with "
        "--sequence_dropout) for --affine_metric segmentation", flag="segmenter")
    device: str = setting("cpu", "device for the non-rigid and segmenter networks")
    # The registration networks are small: one thread per process is fastest on CPU, and
    # several threads per process stall each other when processes share the cores.
    torch_threads: int = setting(1, cli=False)


def assign_splits(case_ids: list[str], test_every: int) -> dict[str, str]:
    """The release's split: sorted cases ``[0::test_every]`` are test volumes (case0001, case0006,
    ... for 5), the others train; ``test_every=0`` tests none."""
    test = set(release_test_cases(case_ids, test_every))
    return {case_id: "test_vol" if case_id in test else "train" for case_id in sorted(case_ids)}


def manifest_path(out_root: Path, case_id: str) -> Path:
    return ProcessedLayout(Path(out_root)).manifest_dir() / f"{case_id}.json"


def slice_name(case_id: str, index: int) -> str:
    return f"{case_id}_slice{index:03d}"


def write_case(layout: ProcessedLayout, processed: ProcessedCase | None, test: TestForm,
               split: str, qa: bool = True, voxelmorph_sha256: str | None = None,
               sources_sha256: dict[str, str] | None = None) -> None:
    """Write one case's training slices (unless ``processed`` is None) and test volume; the
    manifest goes last as the completion mark.

    ``split`` is the release split the case belongs to; ``voxelmorph_sha256`` names the
    checkpoint of the non-rigid network used (None: none).
    """
    manifest: dict[str, Any] = dict(test.manifest)
    # Incomplete until the manifest is written again; the old slices go first (a case may now
    # have fewer), so no file of the previous version survives beside the new ones.
    manifest_path(layout.root, test.case_id).unlink(missing_ok=True)
    for modality in MODALITIES:
        for old in (layout.root / modality / "train_npz").glob(f"{test.case_id}_slice*.npz"):
            old.unlink()
    if processed is not None:
        for modality, stack in processed.images.items():
            for index in range(stack.shape[0]):
                path = layout.item_path(modality, "train", slice_name(processed.case_id, index))
                write_training_slice(path, stack[index], processed.label[index])
        fields_path = layout.root / "manifests" / f"{processed.case_id}_fields.npz"
        with atomic_path(fields_path) as tmp:
            np.savez_compressed(tmp, **processed.fields)
        if qa and processed.unregistered:
            write_qa_png(layout.root / "qa" / f"{processed.case_id}.png", processed.case_id,
                         processed.manifest["label_modality"], processed.label,
                         processed.unregistered, processed.images)
        manifest = processed.manifest | manifest | {"fields_file": fields_path.name}
    for modality in MODALITIES:
        write_test_volume(layout.item_path(modality, "test_vol", test.case_id),
                          test.stacks.channel(modality), test.label, test.spacing)
    write_json(manifest_path(layout.root, test.case_id), manifest | {
        "format": CASE_FORMAT, "split": split,
        "forms": ["train", "test_vol"] if processed is not None else ["test_vol"],
        "num_slices": 0 if processed is None else processed.label.shape[0],
        "voxelmorph_sha256": voxelmorph_sha256, "sources_sha256": sources_sha256})


@dataclass
class TestForm:
    """A case's label-free test volume: the crop-grid stacks and the label on those grids."""

    case_id: str
    stacks: GridStacks
    label: np.ndarray
    spacing: tuple[float, float, float]
    manifest: dict


def test_form(case: RawCase, config: PreprocessConfig) -> TestForm:
    """Steps 1-2 without the label, exactly as prediction prepares a new patient; the label is
    only resampled onto the result, for scoring."""
    if case.label is None or case.label_modality is None:
        raise ValueError(f"{case.case_id}: a test volume needs a label to be scored against")
    stacks = grid_stacks(case.case_id, case.images, config)
    label = stacks.label_on_grids(case.label, case.label_modality)
    reference = case.images[stacks.reference]
    spacing = (reference.spacing[0], config.pixel_spacing_mm, config.pixel_spacing_mm)
    manifest = {
        "case_id": case.case_id, "config": config.to_dict(),
        # Absolute: test.py reads them from wherever it runs, for registration and native scores.
        "sources": {name: str(Path(v.source).resolve()) for name, v in case.images.items()}
        | {"label": str(Path(case.label.source).resolve())},
        "label_modality": case.label_modality,
        "test_volume": stacks.record() | {"spacing": list(spacing)},
    }
    return TestForm(case.case_id, stacks, label, spacing, manifest)


def run_preprocessing(raw_root: str | Path, out_root: str | Path,
                      config: PreprocessConfig | None = None,
                      options: RunOptions | None = None) -> list[CaseResult]:
    """Preprocess every case under ``raw_root`` into ``out_root`` and (re)write the lists.

    Failures of single cases do not stop the others; they are reported together at the end as a
    ``RuntimeError`` naming each case and its problem, after the finished cases are written.
    """
    config = config or PreprocessConfig()
    options = options or RunOptions()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(options.torch_threads)
    try:
        return _run(raw_root, Path(out_root), config, options)
    finally:
        torch.set_num_threads(previous_threads)


def _run(raw_root: str | Path, out_root: Path, config: PreprocessConfig,
         options: RunOptions) -> list[CaseResult]:
    work = out_root / ".work"
    required = () if options.allow_missing else MODALITIES
    cases = {files.case_id: files
             for files in discover_cases(raw_root, options.layout, required=required)}
    splits = assign_splits(list(cases), options.test_every)
    checkpoint = options.voxelmorph_checkpoint or out_root / VOXELMORPH_CHECKPOINT
    # The network a finished case must have been written through: none, the reusable
    # checkpoint, or one still to be trained (then no finished case qualifies).
    network = None
    if config.nonrigid_registration:
        network = _reusable_checkpoint(checkpoint, config, options) or RETRAIN
    results: dict[str, CaseResult] = {}
    errors: dict[str, str] = {}
    todo = []
    fingerprints = {case_id: source_fingerprints(files) for case_id, files in cases.items()}
    for case_id, files in cases.items():
        finished = _finished(out_root, case_id, config, network, fingerprints[case_id])
        if finished is not None and not options.overwrite:
            results[case_id] = CaseResult(case_id, splits[case_id], finished, 0.0, skipped=True)
        else:
            todo.append(files)

    segmenter = None
    if config.affine_registration and config.affine_metric == "segmentation":
        if options.segmenter_checkpoint is None:
            raise ValueError("affine_metric 'segmentation' needs a segmenter checkpoint "
                             "(--segmenter)")
        segmenter = str(options.segmenter_checkpoint)
        cached_segmenter(segmenter, options.device)  # a bad checkpoint fails before any case
    # A CUDA segmenter cannot cross a fork: with a GPU the align stage runs in this process.
    align_workers = options.workers if segmenter is None or options.device == "cpu" else 1
    align_seconds = _parallel("align", _align_to_disk,
                              {f.case_id: (f, config, work, segmenter, options.device)
                               for f in todo},
                              align_workers, errors)

    model = None
    aligned_ids = sorted(align_seconds)
    trainable = [case_id for case_id in aligned_ids if align_seconds[case_id][1] > 0]
    if config.nonrigid_registration and trainable:
        model = _voxelmorph_model(checkpoint, network != RETRAIN, work, trainable, splits,
                                  config, options)
        if network == RETRAIN:
            network = file_sha256(checkpoint)

    finish_seconds = _parallel(
        "register+write", _finish_from_disk,
        {i: (cases[i], config, work, out_root, splits[i], model, network, options,
             fingerprints[i]) for i in aligned_ids},
        options.workers if model is None else 1, errors)
    for case_id, (seconds, num_slices) in finish_seconds.items():
        results[case_id] = CaseResult(case_id, splits[case_id], num_slices,
                                      align_seconds[case_id][0] + seconds, skipped=False)
    if work.is_dir() and not any(work.iterdir()):
        work.rmdir()
    for case_id in errors:
        # A case that failed this time but whose earlier, complete version is on disk (its
        # manifest is written last and removed before any rewrite) stays listed.
        path = manifest_path(out_root, case_id)
        if case_id not in results and path.is_file():
            manifest = json.loads(path.read_text())
            if manifest.get("format") == CASE_FORMAT:
                results[case_id] = CaseResult(case_id, splits[case_id],
                                              int(manifest["num_slices"]), 0.0, skipped=True)
    ordered = [results[case_id] for case_id in sorted(results)]
    _write_lists(ProcessedLayout(out_root), ordered, options.folds)
    _write_missing(out_root, [r.case_id for r in ordered])
    if errors:
        details = "\n".join(f"  {case_id}: {error}" for case_id, error in sorted(errors.items()))
        raise RuntimeError(f"{len(errors)} of {len(cases)} cases failed:\n{details}")
    return ordered


def source_fingerprints(files: CaseFiles) -> dict[str, str]:
    """SHA-256 of every raw file of a case: what its processed files were made from."""
    paths = dict(files.images) | ({"label": files.label} if files.label is not None else {})
    return {name: file_sha256(path) for name, path in sorted(paths.items())}


def _finished(out_root: Path, case_id: str, config: PreprocessConfig,
              network: str | None, sources: dict[str, str]) -> int | None:
    """Training-slice count of a case already written in this format with these settings and
    non-rigid network (checkpoint SHA-256, None for none), else None: a case written with other
    settings, e.g. another registration metric, or through another network is done again. Its
    split does not matter: every case holds both forms."""
    path = manifest_path(out_root, case_id)
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("format") != CASE_FORMAT:
        log.info("%s: written in an older format, preprocessing it again", case_id)
        return None
    if manifest.get("config") != _as_json(config.to_dict()):
        log.info("%s: written with other settings, preprocessing it again", case_id)
        return None
    if manifest.get("sources_sha256") != sources:
        log.info("%s: its raw files differ from those it was made from (another raw root, or "
                 "a corrected file), preprocessing it again", case_id)
        return None
    if manifest.get("voxelmorph_sha256") != network and "train" in manifest.get("forms", ()):
        log.info("%s: written through another non-rigid network, preprocessing it again",
                 case_id)
        return None
    return int(manifest["num_slices"])


def _as_json(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), for comparisons."""
    return json.loads(json.dumps(value))


#: stands for a non-rigid network that this run has yet to train
RETRAIN = "to be trained"


def voxelmorph_provenance(config: PreprocessConfig, options: RunOptions) -> dict[str, Any]:
    """What a non-rigid network depends on: the settings that aligned its training pairs
    (affine metric, geometry, intensity window...) and its own training settings."""
    return _as_json({"preprocess": config.to_dict(), "voxelmorph": options.voxelmorph.to_dict()})


def _reusable_checkpoint(checkpoint: Path, config: PreprocessConfig,
                         options: RunOptions) -> str | None:
    """SHA-256 of ``checkpoint`` when this run reuses it, else None (it will be trained).

    The default checkpoint is reused only if trained with the current settings: pairs aligned
    by another affine step, say, teach the network another residual. A checkpoint named by the
    user is always reused, with a warning when its settings differ.
    """
    if not checkpoint.is_file():
        return None
    stored = checkpoint_provenance(checkpoint)
    wanted = voxelmorph_provenance(config, options)
    if stored != wanted:
        differ = ", ".join(sorted(
            f"{group}.{key}" for group in wanted
            for key in set(wanted[group]) | set(stored.get(group, {}))
            if wanted[group].get(key) != stored.get(group, {}).get(key))) if stored else None
        why = f"other settings ({differ})" if differ else "no recorded settings"
        if options.voxelmorph_checkpoint is None:
            log.info("non-rigid registration: %s was trained with %s; training again",
                     checkpoint, why)
            return None
        log.warning("non-rigid registration: reusing %s as asked, although it was trained with "
                    "%s", checkpoint, why)
    return file_sha256(checkpoint)


def _parallel(stage: str, function: Callable[..., Any], calls: dict[str, tuple], workers: int,
              errors: dict[str, str]) -> dict[str, Any]:
    """``function(*calls[case_id])`` for every case, in ``workers`` processes.

    Returns the results by case id; a case whose call raises a data error lands in ``errors``.
    """
    done: dict[str, Any] = {}
    if not calls:
        return done
    progress = tqdm(total=len(calls), desc=stage, unit="case")
    if workers <= 1:
        for case_id, arguments in calls.items():
            try:
                done[case_id] = function(*arguments)
            except (ValueError, OSError) as error:
                errors[case_id] = str(error)
            progress.update()
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(function, *arguments): case_id
                       for case_id, arguments in calls.items()}
            for future in as_completed(futures):
                try:
                    done[futures[future]] = future.result()
                except (ValueError, OSError) as error:
                    errors[futures[future]] = str(error)
                progress.update()
    progress.close()
    return done


def _work_path(work: Path, case_id: str) -> Path:
    return work / f"{case_id}.aligned.pkl"


def _align_to_disk(files: CaseFiles, config: PreprocessConfig, work: Path,
                   segmenter: str | None = None, device: str = "cpu") -> tuple[float, int]:
    """Stage 1 for one case; the aligned case is parked on disk (keeps memory flat).

    ``segmenter`` is a checkpoint path: each process loads the network once.
    """
    start = time.perf_counter()
    network = None
    if segmenter is not None:
        network = cached_segmenter(segmenter, device)
    case = load_case(files)
    try:
        aligned = align_case(case, config, network)
    except NoMyocardiumError as error:
        # Still a test volume (prediction needs no label); it cannot train.
        log.warning("%s; written as a test volume only", error)
        aligned = None
    with atomic_path(_work_path(work, files.case_id)) as tmp:
        tmp.write_bytes(pickle.dumps(aligned, protocol=pickle.HIGHEST_PROTOCOL))
    return time.perf_counter() - start, 0 if aligned is None else len(aligned.grids)


def _load_aligned(work: Path, case_id: str) -> AlignedCase | None:
    return pickle.loads(_work_path(work, case_id).read_bytes())


def registration_pairs(cases: Iterable[AlignedCase], config: PreprocessConfig
                       ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(fixed, moving, metric mask) ROI slices of every moving sequence of aligned cases."""
    pairs = []
    for aligned in cases:
        masks = aligned.metric_mask(config.affine.mask_margin_mm, config.pixel_spacing_mm)
        for name in aligned.moving:
            pairs.extend(zip(aligned.images[aligned.fixed], aligned.images[name], masks,
                             strict=True))
    return pairs


def _voxelmorph_model(checkpoint: Path, reuse: bool, work: Path, aligned_ids: list[str],
                      splits: dict[str, str], config: PreprocessConfig, options: RunOptions):
    """Reuse the checkpoint, or train on the training cases' pairs and save it there."""
    device = torch.device(options.device)
    if reuse:
        log.info("non-rigid registration: reusing %s", checkpoint)
        return load_voxelmorph(checkpoint, device)
    train_ids = [case_id for case_id in aligned_ids if splits[case_id] == "train"] or aligned_ids
    pairs = registration_pairs((_load_aligned(work, i) for i in train_ids), config)
    log.info("non-rigid registration: training on %d slice pairs of %d cases -> %s", len(pairs),
             len(train_ids), checkpoint)
    return train_voxelmorph(pairs, options.voxelmorph, device, checkpoint,
                            provenance=voxelmorph_provenance(config, options))


def _finish_from_disk(files: CaseFiles, config: PreprocessConfig, work: Path, out_root: Path,
                      split: str, model, network: str | None, options: RunOptions,
                      sources: dict[str, str] | None = None) -> tuple[float, int]:
    """Stage 3 for one case: non-rigid fields, final resampling, files, manifest (``network``:
    the SHA-256 of ``model``'s checkpoint, None without the non-rigid step)."""
    start = time.perf_counter()
    aligned = _load_aligned(work, files.case_id)
    case = load_case(files)
    processed = None if aligned is None else finish_case(case, aligned, config, model,
                                                         torch.device(options.device))
    write_case(ProcessedLayout(out_root), processed, test_form(case, config), split,
               qa=options.qa, voxelmorph_sha256=network, sources_sha256=sources)
    _work_path(work, files.case_id).unlink(missing_ok=True)
    return time.perf_counter() - start, 0 if processed is None else processed.label.shape[0]


def _write_lists(layout: ProcessedLayout, results: list[CaseResult], folds: int) -> None:
    """The release split's lists and, for ``folds`` >= 2, every fold's; a case without training
    slices is only ever tested."""
    slices = {r.case_id: [slice_name(r.case_id, i) for i in range(r.num_slices)]
              for r in results}
    splits = {"train": [r.case_id for r in results if r.split == "train"],
              "test_vol": [r.case_id for r in results if r.split == "test_vol"]}
    _write_split(layout.list_dir, splits["train"], splits["test_vol"], slices)
    if folds >= 2:
        if len(results) < folds:
            log.warning("%d cases cannot fill %d folds; no fold lists written", len(results),
                        folds)
            return
        ids = [r.case_id for r in results]
        for fold in range(folds):
            train, test = fold_cases(ids, folds, fold)
            _write_split(fold_list_dir(layout.list_dir, folds, fold), train, test, slices)


def _write_missing(out_root: Path, case_ids: list[str]) -> None:
    """``<out_root>/missing.json`` (:mod:`datasets.missing`) from the manifests' ``present``
    sequences, when some case lacks one; a stale file goes otherwise."""
    absent = {}
    for case_id in case_ids:
        manifest = json.loads(manifest_path(out_root, case_id).read_text())
        present = manifest.get("present", MODALITIES)
        lacking = tuple(name for name in MODALITIES if name not in present)
        if lacking:
            absent[case_id] = lacking
    path = out_root / DATASET_MISSING_FILE
    if absent:
        MissingSequences(absent).write(path)
        log.info("%d case(s) lack a sequence; recorded in %s", len(absent), path)
    else:
        path.unlink(missing_ok=True)


def _write_split(directory: Path, train: list[str], test: list[str],
                 slices: dict[str, list[str]]) -> None:
    both = sorted(set(train) & set(test))
    if both:
        raise ValueError(f"cases in both the train and test lists: {both}")
    names = {"train": [name for case_id in train for name in slices[case_id]], "test_vol": test}
    for split, listed in names.items():
        write_text(directory / f"{split}.txt", "".join(f"{name}\n" for name in listed))
