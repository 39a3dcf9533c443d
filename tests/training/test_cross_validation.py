"""Cross-validation end to end: fold lists, one command for every fold, out-of-fold scores.

Five phantom cases, preprocessed into both forms with 5 fold lists; a tiny network trained for
one epoch per fold; test.py then scores every case exactly once, each by the fold that did not
train on it, label-free, in native space.
"""

from __future__ import annotations

import json

import pytest

import commands.predict as predict
import commands.test as test_script
import commands.train as train_script
from datasets.phantom import write_phantom_dataset
from networks.checkpoint import CHECKPOINT_FINAL
from preprocessing.pipeline import PreprocessConfig
from preprocessing.runner import RunOptions, run_preprocessing

FOLDS = 5


@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    base = tmp_path_factory.mktemp("cv")
    write_phantom_dataset(base / "raw", FOLDS, seed=3)
    out = base / "processed"
    run_preprocessing(base / "raw", out, PreprocessConfig(affine_registration=False,
                                                          nonrigid_registration=False),
                      RunOptions(folds=FOLDS, qa=False))
    return out


def _train(processed, run, *extra):
    return train_script.main([
        "--model", "transunet", "--vit_name", "tiny", "--root_path", str(processed),
        "--max_epochs", "1", "--batch_size", "4", "--val_every", "0", "--val_fraction", "0",
        "--num_workers", "0", "--device", "cpu", "--folds", str(FOLDS), "--output_dir",
        str(run), *extra])


def test_every_fold_trains_and_every_case_is_scored_once_out_of_fold(processed, tmp_path,
                                                                      capsys):
    run = tmp_path / "cv"
    assert _train(processed, run) == 0
    for fold in range(FOLDS):
        config = json.loads((run / f"fold{fold}" / "config.json").read_text())
        assert config["fold"] == fold and config["list_dir"].endswith(f"cv5/fold{fold}")
    # Rerun with --resume: finished folds are skipped, an unfinished one continues.
    (run / "fold3" / CHECKPOINT_FINAL).unlink()
    before = (run / "fold0" / CHECKPOINT_FINAL).stat().st_mtime_ns
    assert _train(processed, run, "--resume") == 0
    printed = capsys.readouterr().out
    assert "fold 0: finished" in printed and "fold 3: finished" not in printed
    assert (run / "fold0" / CHECKPOINT_FINAL).stat().st_mtime_ns == before
    assert (run / "fold3" / CHECKPOINT_FINAL).is_file()

    out = tmp_path / "oof"
    assert test_script.main(["--run_dir", str(run), "--device", "cpu",
                             "--output_dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["space"] == "native" and summary["roi_given"] == []
    assert summary["settings"]["evaluation"] == "out of fold over 5 folds"
    scored = [row["case"] for row in summary["cases"]]
    assert scored == [f"case{i:04d}" for i in range(1, FOLDS + 1)]  # each once
    # Each case was scored by the one fold that held it out.
    for fold in range(FOLDS):
        tested = (processed / "lists" / "cv5" / f"fold{fold}" / "test_vol.txt").read_text()
        assert tested.split() == [f"case{fold + 1:04d}"]


def test_an_unfinished_fold_is_refused_and_an_ensemble_warns_about_leaks(processed, tmp_path,
                                                                         capsys):
    run = tmp_path / "cv"
    assert _train(processed, run, "--fold", "1") == 0
    assert test_script.main(["--run_dir", str(run), "--device", "cpu"]) == 1
    assert "fold(s) without checkpoint_final.pth" in capsys.readouterr().err
    for fold in (0, 2, 3, 4):
        assert _train(processed, run, "--fold", str(fold)) == 0
    out = tmp_path / "ensemble"
    assert test_script.main(["--run_dir", str(run), "--ensemble", "--device", "cpu",
                             "--output_dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["evaluation"] == "ensemble of 5"
    # The release split's test cases trained in 4 of the 5 folds: said, not hidden.
    assert "not held-out" in capsys.readouterr().err
    # predict.py on a new case with the cross-validation folder: the 5 folds as one ensemble.
    raw = processed.parent / "raw"
    out = tmp_path / "new_patient.nii.gz"
    assert predict.main(["--run_dir", str(run), "--device", "cpu", "--case_dir", str(raw),
                         "--case_id", "case0002", "--out", str(out)]) == 0
    assert "ensemble of 5" in capsys.readouterr().err
    assert out.is_file()
    assert train_script.main(["--fold", "1"]) == 2  # --fold needs --folds


def test_a_fold_killed_before_its_first_checkpoint_starts_again(processed, tmp_path):
    """`make myops_cv` reruns with --resume: a fold that left only config.json (killed in its
    first epoch) starts afresh instead of being refused as a run to protect."""
    run = tmp_path / "cv"
    (run / "fold0").mkdir(parents=True)
    (run / "fold0" / "config.json").write_text("{}")
    assert _train(processed, run, "--fold", "0", "--resume") == 0
    assert (run / "fold0" / CHECKPOINT_FINAL).is_file()
