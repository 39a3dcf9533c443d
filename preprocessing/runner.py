"""Run the per-case pipeline over a raw dataset and pack the result into the seed layout.

Each case is independent, so cases run in parallel processes. A case counts as done once its
manifest exists (written last, atomically), which makes reruns skip finished work and makes an
interrupted run safe to restart.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from datasets.processed import ProcessedLayout, write_test_volume, write_training_slice
from datasets.raw import CaseFiles, discover_cases, load_case
from preprocessing.pipeline import PreprocessConfig, ProcessedCase, preprocess_case
from utils import write_json, write_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaseResult:
    case_id: str
    split: str
    num_slices: int
    seconds: float
    skipped: bool


def assign_splits(case_ids: list[str], test_every: int) -> dict[str, str]:
    """Every ``test_every``-th case (1-based, in sorted order) is a test volume, as in the seed."""
    if test_every < 0:
        raise ValueError(f"test_every must be >= 0, got {test_every}")
    return {case_id: "test_vol" if test_every and (i + 1) % test_every == 0 else "train"
            for i, case_id in enumerate(sorted(case_ids))}


def manifest_path(out_root: Path, case_id: str) -> Path:
    return Path(out_root) / "manifests" / f"{case_id}.json"


def slice_name(case_id: str, index: int) -> str:
    return f"{case_id}_slice{index:03d}"


def write_case(layout: ProcessedLayout, processed: ProcessedCase, split: str) -> None:
    """Write one case's files for ``split``; the manifest goes last as the completion mark."""
    for modality, stack in processed.images.items():
        if split == "train":
            for index in range(stack.shape[0]):
                path = layout.item_path(modality, "train", slice_name(processed.case_id, index))
                write_training_slice(path, stack[index], processed.label[index])
        else:
            path = layout.item_path(modality, "test_vol", processed.case_id)
            write_test_volume(path, stack, processed.label, processed.spacing)
    write_json(manifest_path(layout.root, processed.case_id), processed.manifest | {"split": split})


def process_one(files: CaseFiles, out_root: Path, split: str, config: PreprocessConfig,
                overwrite: bool) -> CaseResult:
    """Load, preprocess and write one case (runs in a worker process)."""
    start = time.perf_counter()
    marker = manifest_path(out_root, files.case_id)
    if marker.is_file() and not overwrite:
        manifest = json.loads(marker.read_text())
        if manifest.get("split") == split:
            return CaseResult(files.case_id, split, manifest["num_slices"], 0.0, skipped=True)
    processed = preprocess_case(load_case(files), config)
    write_case(ProcessedLayout(out_root), processed, split)
    return CaseResult(files.case_id, split, processed.label.shape[0],
                      time.perf_counter() - start, skipped=False)


def run_preprocessing(raw_root: str | Path, out_root: str | Path,
                      config: PreprocessConfig | None = None, *, test_every: int = 5,
                      workers: int = 1, overwrite: bool = False,
                      layout: str | None = None) -> list[CaseResult]:
    """Preprocess every case under ``raw_root`` into ``out_root`` and (re)write the lists.

    Failures of single cases do not stop the others; they are reported together at the end as a
    ``RuntimeError`` naming each case and its problem, after the finished cases are written.
    """
    out_root = Path(out_root)
    config = config or PreprocessConfig()
    cases = discover_cases(raw_root, layout)
    splits = assign_splits([case.case_id for case in cases], test_every)
    results: list[CaseResult] = []
    errors: dict[str, str] = {}
    progress = tqdm(total=len(cases), desc="preprocess", unit="case")
    if workers <= 1:
        for files in cases:
            try:
                results.append(process_one(files, out_root, splits[files.case_id], config,
                                           overwrite))
            except (ValueError, OSError) as error:
                errors[files.case_id] = str(error)
            progress.update()
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(process_one, files, out_root, splits[files.case_id], config,
                                   overwrite): files.case_id for files in cases}
            for future in as_completed(futures):
                try:
                    results.append(future.result())
                except (ValueError, OSError) as error:
                    errors[futures[future]] = str(error)
                progress.update()
    progress.close()

    results.sort(key=lambda result: result.case_id)
    _write_lists(ProcessedLayout(out_root), results)
    if errors:
        details = "\n".join(f"  {case_id}: {error}" for case_id, error in sorted(errors.items()))
        raise RuntimeError(f"{len(errors)} of {len(cases)} cases failed:\n{details}")
    return results


def _write_lists(layout: ProcessedLayout, results: list[CaseResult]) -> None:
    train = [slice_name(r.case_id, i) for r in results if r.split == "train"
             for i in range(r.num_slices)]
    test = [r.case_id for r in results if r.split == "test_vol"]
    for split, names in (("train", train), ("test_vol", test)):
        write_text(layout.list_path(split), "".join(f"{name}\n" for name in names))
