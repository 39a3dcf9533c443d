"""The Makefile's measurement targets train what their docs say: every table row without the
training jitter (TABLE_JITTER), the jitter rows with theirs (the last flag given wins)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["myops", "myops_subsets", "myops_cv_train", "myops_ablation_pixel_exchange",
           "myops_ablation_immseg_released", "myops_missing", "myops_semi", "myops_cine",
           "myops_transunet_equal_time", "myops_jitter", "myops_jitter_matched"]


def _trainings(*targets: str) -> list[str]:
    """The train.py command lines `make -n` prints for ``targets`` (one per invocation)."""
    printed = subprocess.run(["make", "-n", "-B", *targets], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
    commands = []
    for line in printed.replace("\\\n", " ").splitlines():
        for part in line.split("train.py ")[1:]:
            commands.append(re.split(r"&&|;", part)[0])
    return commands


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_table_rows_train_without_jitter_and_the_jitter_rows_with_it():
    jitter = {}
    for command in _trainings(*TARGETS):
        values = re.findall(r"--sequence_jitter (\S+)", command)
        out = re.search(r"--output_dir (\S+)", command)
        assert values, f"no --sequence_jitter in: {command}"
        jitter[out.group(1) if out else command] = float(values[-1])
    assert len(jitter) >= 14  # every row of every target above
    rows = {name.rsplit("/", 1)[-1]: value for name, value in jitter.items()}
    assert rows.pop("immseg_jitter") == 0.5 and rows.pop("immseg_jitter_matched") == 1.0
    assert set(rows.values()) == {0.0}, rows
    assert _trainings("myops_cv_train", "TABLE_JITTER=0.3")[0].count("--sequence_jitter 0.3")
