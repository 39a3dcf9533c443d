"""Training with missing sequences: imbalanced draws, the missing file, the dataset's masks and a
training run that uses them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import commands.train as train_script
from datasets.dataset import SliceDataset
from datasets.labels import MODALITIES
from datasets.missing import MissingFileError, MissingSequences, draw_missing, main, parse_rates
from datasets.processed import ProcessedLayout
from prompts.bank import save_prior_bank
from tests.helpers import random_bank, write_ring_dataset

CASES = [f"Case{3000 + i:04d}" for i in range(30)]
RATES = {"bSSFP": 0.2, "LGE": 0.4, "T2w": 0.6}


def test_imbalanced_rates_are_exact_and_no_case_loses_everything():
    drawn = draw_missing(CASES, RATES, seed=0)
    assert drawn.counts() == {"bSSFP": 6, "LGE": 12, "T2w": 18}
    assert all(len(names) < 3 for names in drawn.absent.values())
    assert draw_missing(reversed(CASES), RATES, seed=0) == drawn  # a function of the sorted ids
    assert draw_missing(CASES, RATES, seed=1).absent != drawn.absent
    # 0.9 each would need 81 absences; 30 cases can lose at most 2 sequences each (60).
    with pytest.raises(ValueError, match="without any sequence"):
        draw_missing(CASES, {"bSSFP": 0.9, "LGE": 0.9, "T2w": 0.9}, seed=0)
    with pytest.raises(ValueError, match="unknown sequence"):
        draw_missing(CASES, {"T1": 0.1}, seed=0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        draw_missing(CASES, {"LGE": 1.0}, seed=0)
    assert parse_rates("bSSFP=0.2,LGE=0.4,T2w=0.6") == RATES


def test_missing_file_round_trip_and_bad_files(tmp_path):
    drawn = draw_missing(CASES, RATES, seed=3)
    path = drawn.write(tmp_path / "missing.json")
    assert MissingSequences.read(path) == drawn
    case, names = next(iter(drawn.absent.items()))
    presence = drawn.presence(f"{case}_slice002")  # slices take their case's record
    assert presence.tolist() == [s not in names for s in MODALITIES]
    assert drawn.presence("Case9999").all()
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(MissingFileError, match="not JSON"):
        MissingSequences.read(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"absent": {}}))
    with pytest.raises(MissingFileError, match="not a missing-sequences file"):
        MissingSequences.read(tmp_path / "other.json")
    payload = drawn.to_json() | {"absent": {"Case3000": list(MODALITIES)}}
    (tmp_path / "empty.json").write_text(json.dumps(payload))
    with pytest.raises(MissingFileError, match="every sequence absent"):
        MissingSequences.read(tmp_path / "empty.json")


@pytest.fixture(scope="module")
def ring_root(tmp_path_factory):
    return write_ring_dataset(tmp_path_factory.mktemp("ring"), train_cases=4, slices_per_case=3)


def test_dataset_masks_a_cases_absent_sequences_in_every_epoch(ring_root):
    layout = ProcessedLayout(ring_root)
    names = layout.names("train")
    missing = MissingSequences({"case0001": ("LGE",), "case0002": ("bSSFP", "T2w")})
    plain = SliceDataset(layout, names, 32, None, seed=0, missing=missing)
    dropped = SliceDataset(layout, names, 32, None, seed=0, sequence_dropout=0.9,
                           missing=missing)
    for epoch in range(4):
        for index, name in enumerate(names):
            item = plain[(epoch, index)]
            expected = missing.presence(name)
            assert item["sequence_mask"].tolist() == expected.tolist()
            assert torch.all(item["image"][~torch.from_numpy(expected)] == 0)
            assert torch.all(item["image"][torch.from_numpy(expected)].abs().sum((1, 2)) > 0)
            # Dropout draws only among what the case has, and keeps one.
            mask = dropped[(epoch, index)]["sequence_mask"].numpy()
            assert mask.any() and not (mask & ~expected).any()
    # case0002 has LGE alone: dropout can take nothing from it.
    only = [i for i, name in enumerate(names) if name.startswith("case0002")]
    assert all(dropped[(e, i)]["sequence_mask"].tolist() == [False, True, False]
               for e in range(4) for i in only)


def test_draw_command_and_a_training_run_with_missing_sequences(ring_root, tmp_path):
    out = tmp_path / "missing.json"
    assert main(["--root", str(ring_root), "--rates", "bSSFP=0.25,T2w=0.5", "--seed", "0",
                 "--out", str(out)]) == 0
    drawn = MissingSequences.read(out)
    assert drawn.counts() == {"bSSFP": 1, "LGE": 0, "T2w": 2}
    bank = save_prior_bank(random_bank(), tmp_path / "bank.pt")
    common = ["--dataset", "Myops", "--model", "immseg", "--vit_name", "tiny", "--root_path",
              str(ring_root), "--img_size", "32", "--batch_size", "4", "--max_epochs", "1",
              "--num_workers", "0", "--val_every", "0", "--val_fraction", "0", "--device",
              "cpu", "--priors_path", str(bank)]
    run = tmp_path / "run"
    assert train_script.main([*common, "--missing_file", str(out), "--output_dir",
                              str(run)]) == 0
    assert json.loads((run / "config.json").read_text())["missing_file"] == str(out)
    # A file naming cases the data root does not hold was drawn for other data: refused.
    foreign = MissingSequences({"case0009": ("LGE",)}).write(tmp_path / "foreign.json")
    assert train_script.main([*common, "--missing_file", str(foreign), "--output_dir",
                              str(tmp_path / "run2")]) == 1
    assert np.array_equal(drawn.presence("case0001"), drawn.presence("case0001_slice000"))
    every = tmp_path / "every.json"
    assert main(["--root", str(ring_root), "--rates", "LGE=0.5", "--all_cases", "--out",
                 str(every)]) == 0
    assert MissingSequences.read(every).counts()["LGE"] == 2


def test_raw_cases_lacking_a_sequence_preprocess_train_and_test(tmp_path):
    """preprocess_data.py --allow_missing: a case without T2w is written with a zero T2w
    channel and recorded; train.py masks it by itself; test.py gives it what it has."""
    import commands.test as test_script
    from datasets.phantom import write_phantom_dataset
    from datasets.raw import RawDataError, discover_cases
    from preprocessing.pipeline import PreprocessConfig
    from preprocessing.runner import RunOptions, run_preprocessing

    raw, out = tmp_path / "raw", tmp_path / "processed"
    write_phantom_dataset(raw, 3, seed=2)
    lacking = discover_cases(raw)[1]
    lacking.images["T2w"].unlink()
    config = PreprocessConfig(nonrigid_registration=False, affine_metric="ngf")
    with pytest.raises(RawDataError, match="lacks T2w"):
        run_preprocessing(raw, out, config, RunOptions(test_every=3, folds=0, qa=False))
    run_preprocessing(raw, out, config, RunOptions(test_every=3, folds=0, qa=False,
                                                   allow_missing=True))
    recorded = MissingSequences.read(out / "missing.json")
    assert recorded.absent == {lacking.case_id: ("T2w",)}
    layout = ProcessedLayout(out)
    names = [n for n in layout.names("train") if n.startswith(lacking.case_id)]
    assert names
    for name in names:
        image, _ = layout.read_slice(name)
        assert not image[2].any() and image[1].any()  # T2w zeros, LGE kept
    bank = save_prior_bank(random_bank(), tmp_path / "bank.pt")
    run = tmp_path / "run"
    assert train_script.main([
        "--dataset", "Myops", "--model", "immseg", "--vit_name", "tiny", "--root_path",
        str(out), "--img_size", "128", "--batch_size", "4", "--max_epochs", "1",
        "--num_workers", "0", "--val_every", "0", "--val_fraction", "0", "--device", "cpu",
        "--priors_path", str(bank), "--output_dir", str(run)]) == 0
    assert "absent bSSFP 0, LGE 0, T2w 1" in (run / "log.txt").read_text()
    # The lacking case as a test volume: predicted from bSSFP and LGE.
    (out / "lists" / "test_vol.txt").write_text(f"{lacking.case_id}\n")
    assert test_script.main(["--run_dir", str(run), "--device", "cpu"]) == 0
