"""Shared helpers: numeric setting checks and atomic writes."""

from __future__ import annotations

import errno
import json
from dataclasses import dataclass

import numpy as np
import pytest

from preprocessing.affine_registration import check_pyramid
from utils import (
    aligned_rows,
    atomic_path,
    file_sha256,
    remove_stale_temporaries,
    require_finite,
    require_finite_fields,
    write_json,
)


@pytest.mark.parametrize("value", [0, 0.0, 3, 2.5, np.float32(1.5), np.int64(4)])
def test_require_finite_accepts_finite_non_negative_numbers(value):
    require_finite(weight=value)


@pytest.mark.parametrize("value", [-1e-9, float("nan"), float("inf"), -float("inf"), True, "1",
                                   None])
def test_require_finite_refuses_and_names_the_setting(value):
    with pytest.raises(ValueError, match=r"^weight must be finite and >= 0, got "):
        require_finite(weight=value)


def test_require_finite_positive_refuses_zero_and_names_the_first_bad_one():
    require_finite(a=1e-12, positive=True)
    with pytest.raises(ValueError, match=r"^b must be finite and > 0, got 0"):
        require_finite(a=1.0, b=0, c=-1, positive=True)


def test_require_finite_fields_reads_attributes():
    @dataclass
    class Settings:
        sigma: float = 1.0
        margin: float = -2.0

    require_finite_fields(Settings(), "sigma")
    with pytest.raises(ValueError, match=r"^margin must be finite and >= 0, got -2\.0$"):
        require_finite_fields(Settings(), "sigma", "margin")


def test_check_pyramid_levels_sigmas_and_iterations():
    check_pyramid((2.0, 0.0), (10, 5), zero_sigma=True)
    with pytest.raises(ValueError, match=r"smoothing_sigmas_mm\[1\] must be finite and > 0"):
        check_pyramid((2.0, 0.0), (10, 5), zero_sigma=False)
    with pytest.raises(ValueError, match="one entry per pyramid level"):
        check_pyramid((2.0,), (10, 5), zero_sigma=True)
    with pytest.raises(ValueError, match="one entry per pyramid level"):
        check_pyramid((), (), zero_sigma=True)
    for iterations in ((0,), (2.5,), (True,)):
        with pytest.raises(ValueError, match="iterations must be ints >= 1"):
            check_pyramid((1.0,), iterations, zero_sigma=True)


def test_atomic_path_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "sub" / "report.json"
    write_json(target, {"version": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer crashed")
    assert json.loads(target.read_text()) == {"version": 1}
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.json"]
    write_json(target, {"version": 2})
    assert json.loads(target.read_text()) == {"version": 2}


def test_file_sha256_known_value_and_change(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"abc")
    # FIPS 180-2's example digest of "abc".
    assert file_sha256(path) == ("ba7816bf8f01cfea414140de5dae2223"
                                 "b00361a396177a9cb410ff61f20015ad")
    before = file_sha256(path)
    path.write_bytes(b"abd")
    assert file_sha256(path) != before


def test_a_failed_write_names_its_file(tmp_path):
    """Disk-full errors come from deep inside writers without a path; atomic_path adds it."""
    target = tmp_path / "summary.json"
    target.write_text("old")
    expected = r"summary.json: cannot write \(No space left on device\)"
    with pytest.raises(OSError, match=expected), atomic_path(target):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_text() == "old"
    assert not list(tmp_path.glob(".*tmp*"))


def test_stale_temporaries_of_a_killed_save_are_removed(tmp_path):
    (tmp_path / ".checkpoint_last.pth.abc123.tmp.pth").write_bytes(b"half")
    (tmp_path / ".log.txt.x.tmp.txt").write_bytes(b"other target")
    (tmp_path / "checkpoint_last.pth").write_bytes(b"good")
    removed = remove_stale_temporaries(tmp_path, "checkpoint_*")
    assert [p.name for p in removed] == [".checkpoint_last.pth.abc123.tmp.pth"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".log.txt.x.tmp.txt",
                                                          "checkpoint_last.pth"]


def test_aligned_rows_left_align_the_first_column_and_right_align_the_rest():
    assert aligned_rows(("name", "x"), [("a", "10.5"), ("long name", "2")]) == [
        "name          x",
        "a          10.5",
        "long name     2",
    ]
