"""A run killed with SIGKILL mid-epoch and resumed ends with the uninterrupted run's weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from networks.checkpoint import CHECKPOINT_FINAL, CHECKPOINT_LAST
from tests.helpers import write_ring_dataset

REPO = Path(__file__).resolve().parents[2]


def _command(root: Path, out: Path, *extra: str, model: str = "transunet",
             epochs: int = 4) -> list[str]:
    # Dropout and augmentation stay on: their randomness is what resuming must replay.
    return [sys.executable, str(REPO / "train.py"), "--model", model, "--vit_name", "tiny",
            "--root_path", str(root), "--output_dir", str(out), "--img_size", "64",
            "--batch_size", "2", "--max_epochs", str(epochs), "--num_workers", "0",
            "--device", "cpu", "--val_every", "1", "--val_fraction", "0.25", "--seed", "3",
            *extra]


def _environment() -> dict[str, str]:
    # One thread: the same reduction order in every run.
    return os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _epoch_of(path: Path) -> int:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=False)["epoch"])
    except (FileNotFoundError, EOFError, RuntimeError):
        return 0


@pytest.mark.parametrize(("model", "flags"), [
    ("transunet", ()),
    # Semi-supervised two-stream batches with repeated labelled slices, consistency from the
    # first epoch and the sequences' progress weights, which the checkpoint must carry.
    ("immseg_noprior", ("--labelled_fraction", "0.5", "--consistency_rampup", "0",
                        "--balance_sequences")),
], ids=["transunet", "immseg_noprior-semi_supervised"])
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path, model, flags):
    root = write_ring_dataset(tmp_path / "data", train_cases=4, slices_per_case=8, size=64)
    reference = subprocess.run(_command(root, tmp_path / "reference", *flags, model=model),
                               env=_environment(), capture_output=True, text=True, check=False)
    assert reference.returncode == 0, reference.stderr[-2000:]

    run = tmp_path / "interrupted"
    process = subprocess.Popen(_command(root, run, *flags, model=model), env=_environment(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while _epoch_of(run / CHECKPOINT_LAST) < 1 and process.poll() is None:
        assert time.monotonic() < deadline, "training never finished its first epoch"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "training ended before it could be killed"
    assert not (run / CHECKPOINT_FINAL).exists()
    killed_at = _epoch_of(run / CHECKPOINT_LAST)
    assert 1 <= killed_at < 4

    resumed = subprocess.run([*_command(root, run, *flags, model=model), "--resume"],
                             env=_environment(),
                             capture_output=True, text=True, check=False)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    expected = torch.load(tmp_path / "reference" / CHECKPOINT_FINAL, weights_only=False)
    actual = torch.load(run / CHECKPOINT_FINAL, weights_only=False)
    assert actual["iteration"] == expected["iteration"] and actual["epoch"] == 4
    assert actual["tracker"] == expected["tracker"]
    for key, value in expected["model"].items():
        assert torch.equal(actual["model"][key], value), key
    assert "optimizer" not in actual  # model-only; the resumable state is in the last one
    expected = torch.load(tmp_path / "reference" / CHECKPOINT_LAST, weights_only=False)
    actual = torch.load(run / CHECKPOINT_LAST, weights_only=False)
    assert actual["epoch"] == expected["epoch"] == 4
    for group, state in expected["optimizer"]["state"].items():
        assert torch.equal(actual["optimizer"]["state"][group]["exp_avg"], state["exp_avg"])


def test_resume_refuses_a_different_run(tmp_path):
    root = write_ring_dataset(tmp_path / "data", train_cases=4, slices_per_case=2)
    run = tmp_path / "run"
    first = subprocess.run(_command(root, run, epochs=1), env=_environment(),
                           capture_output=True, text=True, check=False)
    assert first.returncode == 0, first.stderr[-2000:]
    refused = subprocess.run(_command(root, run, "--resume", model="transunet_single"),
                             env=_environment(), capture_output=True, text=True, check=False)
    assert refused.returncode == 1
    assert "different run configuration" in refused.stderr and "model" in refused.stderr
    missing = subprocess.run(_command(root, tmp_path / "nowhere", "--resume"),
                             env=_environment(), capture_output=True, text=True, check=False)
    assert missing.returncode == 1 and "no checkpoint to resume from" in missing.stderr
