"""Case-level splits: the release's fixed test split and K-fold cross-validation.

Both are pure functions of the sorted case ids, so every machine, process and rerun draws the
same cases, and neither ever splits a case's slices between training and testing.

* The released I_MMSeg code tests on ``filenames[0::5]`` of the sorted cases (case0001,
  case0006, ... of MyoPS380): :func:`release_test_cases`.
* Cross-validation deals the sorted cases round-robin: fold ``k`` tests cases ``k, k + K, ...``
  and trains on the others (:func:`fold_cases`). Fold 0 of 5 is therefore exactly the release's
  test split, and every case is tested in exactly one fold.

Lists live under ``<root>/lists/cv<K>/fold<k>/{train,test_vol}.txt`` (:func:`fold_list_dir`),
beside the release-style ``<root>/lists/{train,test_vol}.txt``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def _sorted_unique(case_ids: Sequence[str]) -> list[str]:
    ordered = sorted(case_ids)
    if len(set(ordered)) != len(ordered):
        repeated = sorted({c for c in ordered if ordered.count(c) > 1})
        raise ValueError(f"case ids listed twice: {repeated}")
    return ordered


def release_test_cases(case_ids: Sequence[str], every: int) -> list[str]:
    """The sorted cases ``[0::every]`` (none for ``every == 0``): the release's test split."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ValueError(f"test_every must be an integer >= 0, got {every!r}")
    return _sorted_unique(case_ids)[0::every] if every else []


def check_fold(folds: int, fold: int | None) -> None:
    """Refuse anything but ``folds >= 2`` and ``0 <= fold < folds`` (integers)."""
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(f"folds must be an integer >= 2, got {folds!r}")
    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < folds:
        raise ValueError(f"fold must be an integer in 0..{folds - 1}, got {fold!r}")


def fold_cases(case_ids: Sequence[str], folds: int, fold: int) -> tuple[list[str], list[str]]:
    """``(train, test)`` case ids of fold ``fold`` of ``folds`` (round-robin on sorted ids)."""
    check_fold(folds, fold)
    ordered = _sorted_unique(case_ids)
    if len(ordered) < folds:
        raise ValueError(f"{len(ordered)} cases cannot fill {folds} folds")
    test = ordered[fold::folds]
    chosen = set(test)
    return [c for c in ordered if c not in chosen], test


def fold_list_dir(lists_root: str | Path, folds: int, fold: int) -> Path:
    """``<lists_root>/cv<folds>/fold<fold>``: where a fold's train and test lists are written."""
    return Path(lists_root) / f"cv{folds}" / f"fold{fold}"
