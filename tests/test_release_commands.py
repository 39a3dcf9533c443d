"""The release README's commands, as written, and train.py's settings declared once."""

from __future__ import annotations

import dataclasses
import json

import pytest

import commands.preprocess as preprocess_data
import commands.test as test_script
import commands.train as train_script
from commands.config_flags import add_config_arguments, given_values
from datasets.phantom import write_phantom_dataset
from prompts.bank import save_prior_bank
from tests.helpers import random_bank
from trainer import TrainConfig

#: Flags that only make the run small; every location is left to the defaults.
SMALL = ["--img_size", "32", "--batch_size", "4", "--max_epochs", "1", "--val_every", "0",
         "--val_fraction", "0", "--num_workers", "0", "--device", "cpu"]


def test_the_release_readme_commands_work_as_written(tmp_path, monkeypatch, capsys):
    """preprocess_data.py reads MyoPS380_dataset/Raw_data and writes Processed_data beside it;
    train.py --dataset Myops --vit_name X trains there with the default prior bank; test.py
    with the same two flags finds that run."""
    monkeypatch.chdir(tmp_path)
    write_phantom_dataset(tmp_path / "MyoPS380_dataset", 5, seed=3)
    release = ["--dataset", "Myops", "--vit_name", "tiny"]
    # Before anything exists, each command names the one to run first.
    assert train_script.main([*release, *SMALL]) == 1
    assert "python preprocess_data.py" in capsys.readouterr().err
    assert preprocess_data.main(["--no_affine", "--no_nonrigid", "--workers", "1"]) == 0
    assert (tmp_path / "MyoPS380_dataset" / "Processed_data" / "lists").is_dir()
    assert train_script.main([*release, *SMALL]) == 1
    assert "python -m prompts.encode" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # a refused start leaves nothing behind
    save_prior_bank(random_bank(), tmp_path / "priors" / "biomedclip.pt")
    assert train_script.main([*release, *SMALL]) == 0
    run = tmp_path / "runs" / "Myops_immseg_tiny"
    assert (run / "checkpoint_final.pth").is_file()
    assert test_script.main([*release, "--device", "cpu", "--stride", "16"]) == 0
    summary = json.loads((run / "test" / "summary.json").read_text())
    # The release split: sorted cases [0::5] of 5.
    assert [row["case"] for row in summary["cases"]] == ["case0001"]
    assert test_script.main(["--dataset", "Myops", "--vit_name", "R26-ViT-S_16"]) == 1
    assert "python train.py" in capsys.readouterr().err


def test_every_setting_is_a_flag_with_its_declared_default(capsys):
    parser = train_script.build_parser()
    flags = {action.dest: action for action in parser._actions}
    for field in dataclasses.fields(TrainConfig):
        if field.metadata.get("cli", True):
            assert field.name in flags, field.name
    assert "num_classes" not in flags  # the dataset's
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: 0.07)" in text and "(default: 1234)" in text  # temperature, seed
    # Only what was typed comes back; the bools keep their historical spellings.
    args = parser.parse_args(["--no_amp", "--share_encoder", "--class_weights", "1", "2", "3",
                              "4", "--seed", "7"])
    assert given_values(args, TrainConfig) == {
        "amp": False, "share_encoder": True, "class_weights": (1.0, 2.0, 3.0, 4.0), "seed": 7}


def test_a_flag_needs_a_type_it_can_parse():
    @dataclasses.dataclass
    class Odd:
        table: dict = dataclasses.field(default_factory=dict)

    import argparse

    with pytest.raises(TypeError, match="cannot make a flag"):
        add_config_arguments(argparse.ArgumentParser(), Odd)


def test_a_saved_config_is_taken_back(tmp_path):
    saved = TrainConfig(model="transunet", vit_name="tiny", root_path="data/x", folds=5, fold=2,
                        output_dir="runs/cv/fold2", seed=9, class_weights=(1.0, 2.0, 3.0, 4.0),
                        sequence_dropout=0.5, amp=False)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(saved.to_dict()))
    args = train_script.build_parser().parse_args(["--config", str(path)])
    values = train_script.settings_of(args)
    # The fold run's folder and lists turn back into the cross-validation it belongs to.
    assert values["output_dir"] == "runs/cv" and values["list_dir"] is None
    rebuilt = TrainConfig(**{**values, "output_dir": "runs/cv/fold2"})
    assert rebuilt == saved
    # A flag given beside --config wins; the rest stays as saved.
    args = train_script.build_parser().parse_args(["--config", str(path), "--seed", "3",
                                                   "--fold", "0"])
    changed = TrainConfig(**{**train_script.settings_of(args), "output_dir": "runs/cv/fold0"})
    assert changed.seed == 3 and changed.fold == 0 and changed.list_dir.endswith("fold0")
    assert changed.sequence_dropout == 0.5 and changed.amp is False
    path.write_text(json.dumps({**saved.to_dict(), "lr": 0.1}))
    with pytest.raises(ValueError, match=r"config\.json: unknown setting\(s\) \['lr'\]"):
        train_script.settings_of(train_script.build_parser().parse_args(["--config", str(path)]))


def test_preprocess_flags_come_from_the_configs(capsys):
    """preprocess_data.py's flags are PreprocessConfig's and RunOptions' fields, under the
    names the command always had."""
    from preprocessing.config import PreprocessConfig
    from preprocessing.runner import RunOptions

    parser = preprocess_data.build_parser()
    args = parser.parse_args(["--no_affine", "--max_slice_distance", "3", "--no_qa",
                              "--segmenter", "seg.pth", "--workers", "2"])
    assert given_values(args, PreprocessConfig) == {"affine_registration": False,
                                                    "max_slice_distance_mm": 3.0}
    options = given_values(args, RunOptions)
    assert options == {"qa": False, "segmenter_checkpoint": preprocess_data.Path("seg.pth"),
                       "workers": 2}
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert f"(default: {PreprocessConfig.roi_size})" in text
    assert f"(default: {RunOptions.test_every})" in text
