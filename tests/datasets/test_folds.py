"""Case-level splits: the release's [0::5] and round-robin K-fold cross-validation."""

from __future__ import annotations

import pytest

from datasets.folds import check_fold, fold_cases, fold_list_dir, release_test_cases

CASES = [f"Case{3000 + i}" for i in (7, 1, 3, 12, 5, 9, 2, 11, 4, 8, 6, 10)]


def test_release_split_is_every_fifth_from_the_first():
    ids = [f"case{i:04d}" for i in range(1, 11)]
    assert release_test_cases(list(reversed(ids)), 5) == ["case0001", "case0006"]
    assert release_test_cases(ids, 0) == []
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="test_every"):
            release_test_cases(ids, bad)


def test_folds_are_deterministic_disjoint_and_cover_every_case_once():
    tested = []
    for fold in range(5):
        train, test = fold_cases(CASES, 5, fold)
        assert fold_cases(list(reversed(CASES)), 5, fold) == (train, test)  # order-free
        assert not set(train) & set(test)
        assert sorted(train + test) == sorted(CASES)
        tested += test
    assert sorted(tested) == sorted(CASES)  # each case out of fold exactly once
    # Round-robin on sorted ids: fold 0 of 5 is the release's test split.
    assert fold_cases(CASES, 5, 0)[1] == release_test_cases(CASES, 5) == [
        "Case3001", "Case3006", "Case3011"]
    assert [len(fold_cases(CASES, 5, k)[1]) for k in range(5)] == [3, 3, 2, 2, 2]


def test_bad_folds_are_refused():
    for folds, fold in ((1, 0), (5, 5), (5, -1), (True, 0), (5, None)):
        with pytest.raises(ValueError, match="fold"):
            check_fold(folds, fold)
    with pytest.raises(ValueError, match="cannot fill"):
        fold_cases(CASES[:3], 5, 0)
    with pytest.raises(ValueError, match="twice"):
        fold_cases([*CASES, CASES[0]], 5, 0)
    assert fold_list_dir("root/lists", 5, 2).as_posix() == "root/lists/cv5/fold2"
