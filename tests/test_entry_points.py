"""train.py -> test.py on a tiny processed dataset, plus the scripts' error handling."""

from __future__ import annotations

import json

import pytest
import torch

import commands.preprocess as preprocess_data
import commands.test as test_script
import commands.train as train_script
from datasets.labels import EVAL_GROUPS
from networks.checkpoint import CHECKPOINT_FINAL, CHECKPOINT_LAST, load_checkpoint
from prompts.bank import save_prior_bank
from tests.helpers import random_bank, write_ring_dataset
from trainer import TrainConfig, poly_lr


@pytest.fixture(scope="module")
def processed_root(tmp_path_factory):
    # 4 training cases of 3 slices, 2 test volumes of 3 slices, 32 x 32, with a case manifest
    # holding the preprocessing config as preprocess_data.py writes it.
    root = write_ring_dataset(tmp_path_factory.mktemp("processed"), train_cases=4,
                              slices_per_case=3, test_cases=("case0005", "case0010"))
    (root / "manifests").mkdir()
    (root / "manifests" / "case0001.json").write_text(json.dumps(
        {"config": {"pixel_spacing_mm": 1.25, "crop_size": 64, "roi_size": 32}}))
    return root


@pytest.fixture(scope="module")
def bank_path(tmp_path_factory):
    """A small prior bank (random unit rows): the plumbing test needs names, not meaning."""
    return save_prior_bank(random_bank(), tmp_path_factory.mktemp("priors") / "bank.pt")


def test_poly_lr_known_values():
    assert poly_lr(1e-3, 0, 100, 0.9) == pytest.approx(1e-3)
    assert poly_lr(1e-3, 50, 100, 0.9) == pytest.approx(1e-3 * 0.5**0.9)
    assert poly_lr(1e-3, 100, 100, 0.9) == 0.0


@pytest.mark.parametrize("change", [
    {"vit_name": "R99"}, {"img_size": 120}, {"batch_size": 0}, {"dataset": "Synapse"},
    {"base_lr": 0.0}, {"base_lr": float("inf")}, {"weight_decay": float("nan")},
    {"model": "unet"}, {"model": "transunet", "cross_attention": "pixel"},
    {"cross_attention": "global"}, {"sequence_jitter": 1.5},
    {"model": "transunet", "priors_path": "bank.pt"}, {"model": "transunet", "aux_weight": -1.0},
    {"model": "transunet", "temperature": 0.0}, {"class_weights": (1.0, 2.0)},
    {"model": "transunet", "balance": True}, {"model": "transunet", "distill_weight": 0.5}])
def test_train_config_rejects_bad_values(change):
    with pytest.raises(ValueError):
        TrainConfig(**({"model": "transunet"} | change))


@pytest.mark.parametrize("variant", ["immseg", "immseg_noprior", "transunet", "transunet_single"])
def test_train_then_test_round_trip(variant, processed_root, bank_path, tmp_path, capsys):
    run = tmp_path / "run"
    priors = ["--priors_path", str(bank_path)] if variant == "immseg" else []
    code = train_script.main(["--dataset", "Myops", "--model", variant, "--vit_name", "tiny",
                              "--root_path", str(processed_root), "--img_size", "32",
                              "--batch_size", "3", "--max_epochs", "2", "--num_workers", "0",
                              "--output_dir", str(run), "--device", "cpu",
                              "--contrastive_start_epoch", "1", "--val_every", "1",
                              "--val_fraction", "0.25", *priors])
    assert code == 0
    config = json.loads((run / "config.json").read_text())
    assert config["vit_name"] == "tiny" and config["max_epochs"] == 2
    assert config["model"] == variant
    payload = torch.load(run / CHECKPOINT_FINAL, weights_only=False)
    # 4 cases, 1 held out for validation: 9 slices / batch 3 x 2 epochs
    assert payload["epoch"] == 2 and payload["iteration"] == 6
    assert (run / "checkpoint_best.pth").is_file()
    assert payload["tracker"]["best_epoch"] in (1, 2)
    assert payload["train_config"] == config
    assert (run / CHECKPOINT_LAST).is_file() and (run / "tensorboard").is_dir()
    # Best and final are model-only; the last one carries what --resume needs.
    best = torch.load(run / "checkpoint_best.pth", weights_only=False)
    last = torch.load(run / CHECKPOINT_LAST, weights_only=False)
    for key in ("optimizer", "scaler", "rng"):
        assert key not in payload and key not in best and key in last
    for key, value in last["model"].items():
        assert torch.equal(payload["model"][key], value)

    assert payload["network"]["variant"] == variant
    # predict.py rebuilds the training grid from the checkpoint alone.
    assert payload["preprocess"] == {"pixel_spacing_mm": 1.25, "crop_size": 64, "roi_size": 32}
    assert (payload["priors"] is not None) == (variant == "immseg")

    # The checkpoint alone rebuilds the same network (for immseg: priors included).
    loaded = load_checkpoint(run / CHECKPOINT_FINAL, torch.device("cpu"))
    assert loaded.img_size == 32 and loaded.model.variant == variant
    state = loaded.model.state_dict()
    for key, value in payload["model"].items():
        assert torch.equal(state[key], value)

    capsys.readouterr()
    code = test_script.main(["--run_dir", str(run), "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    for group in EVAL_GROUPS:
        assert group in printed
    rows = (run / "test" / "per_case.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[1].startswith("case0005")
    summary = json.loads((run / "test" / "summary.json").read_text())
    assert summary

    assert test_script.main(["--run_dir", str(run), "--device", "cpu", "--save_nifti",
                             "--output_dir", str(tmp_path / "with_nifti")]) == 0
    import nibabel as nib

    prediction = nib.load(str(tmp_path / "with_nifti" / "predictions" / "case0005_pred.nii.gz"))
    assert prediction.shape == (32, 32, 3)
    assert prediction.header.get_zooms() == (1.0, 1.0, 10.0)
    assert int(prediction.header["sform_code"]) == 1


def test_scripts_fail_cleanly_on_bad_input(tmp_path, processed_root, capsys):
    def error_of(code: int) -> str:
        assert code == 1
        return capsys.readouterr().err

    assert "raw data folder not found" in error_of(
        preprocess_data.main(["--raw_root", str(tmp_path / "absent")]))
    assert "checkpoint not found" in error_of(
        test_script.main(["--checkpoint", str(tmp_path / "none.pth")]))
    bogus = tmp_path / "bogus.pth"
    torch.save({"weights": 1}, bogus)
    assert "not a checkpoint of this framework" in error_of(
        test_script.main(["--checkpoint", str(bogus), "--root_path", str(processed_root)]))
    assert "no 'train' data found" in error_of(
        train_script.main(["--model", "transunet", "--vit_name", "tiny", "--root_path",
                           str(tmp_path / "nothing"), "--output_dir", str(tmp_path / "run"),
                           "--num_workers", "0"]))
    assert "uses no text priors" in error_of(
        train_script.main(["--model", "transunet", "--vit_name", "tiny", "--root_path",
                           str(processed_root), "--output_dir", str(tmp_path / "run2"),
                           "--priors_path", "bank.pt"]))
    assert "not found" in error_of(
        train_script.main(["--model", "immseg", "--vit_name", "tiny", "--root_path",
                           str(processed_root), "--output_dir", str(tmp_path / "run3"),
                           "--priors_path", str(tmp_path / "absent.pt"), "--num_workers", "0"]))


def test_lists_naming_absent_files_and_diverging_losses_stop_cleanly(tmp_path, capsys):
    root = write_ring_dataset(tmp_path / "data", train_cases=2, slices_per_case=2)
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train.txt").write_text("case0001_slice000\ncase0009_slice004\n")
    args = ["--model", "transunet", "--vit_name", "tiny", "--root_path", str(root),
            "--img_size", "32", "--batch_size", "2", "--num_workers", "0", "--val_every", "0",
            "--val_fraction", "0", "--device", "cpu"]
    assert train_script.main([*args, "--list_dir", str(lists),
                              "--output_dir", str(tmp_path / "listed")]) == 1
    assert "lists 'case0009_slice004' but" in capsys.readouterr().err

    # A learning rate that blows the weights up: the run stops at the first non-finite loss
    # with a message and exit code 1, and no checkpoint holds a non-finite value.
    run = tmp_path / "diverged"
    assert train_script.main([*args, "--optimizer", "sgd", "--base_lr", "1e12",
                              "--max_epochs", "6", "--output_dir", str(run)]) == 1
    assert "non-finite" in capsys.readouterr().err
    assert not (run / CHECKPOINT_FINAL).exists()
    for checkpoint in run.glob("*.pth"):
        state = torch.load(checkpoint, weights_only=False)["model"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_training_starts_from_a_google_layout_npz(processed_root, tmp_path):
    from networks.backbones import create_transunet
    from networks.npz_loader import write_google_npz

    source = create_transunet("tiny", img_size=64, in_channels=3, num_classes=4)
    weights = write_google_npz(source.encoder, tmp_path / "R50+ViT-tiny.npz")
    run = tmp_path / "run"
    args = ["--model", "transunet", "--vit_name", "tiny", "--root_path", str(processed_root),
            "--img_size", "32",
            "--batch_size", "6", "--max_epochs", "1", "--num_workers", "0", "--val_every", "0",
            "--val_fraction", "0", "--output_dir",
            str(run), "--base_lr", "1e-12", "--no_augment", "--pretrained_path", str(weights)]
    assert train_script.main(args) == 0
    trained = torch.load(run / CHECKPOINT_FINAL, weights_only=False)["model"]
    # With a vanishing learning rate the encoder still holds the file's ResNet weights.
    root_key = next(k for k in trained if k.startswith("encoder.") and k.endswith("conv.weight"))
    assert torch.allclose(trained[root_key], source.state_dict()[root_key], atol=1e-6)
    assert train_script.main([*args[:-1], str(tmp_path / "missing.npz"), "--overwrite"]) == 1
    # The failed restart destroyed nothing: the finished run's checkpoint is still the one.
    assert torch.equal(torch.load(run / CHECKPOINT_FINAL, weights_only=False)["model"][root_key],
                       trained[root_key])


def test_a_finished_run_is_never_clobbered(processed_root, tmp_path, capsys):
    """Rerunning into a finished run folder without --resume used to replace its last and final
    checkpoints while checkpoint_best stayed from the old run."""
    run = tmp_path / "run"
    args = ["--model", "transunet", "--vit_name", "tiny", "--root_path", str(processed_root),
            "--img_size", "32", "--batch_size", "6", "--max_epochs", "2", "--num_workers", "0",
            "--val_every", "1", "--val_fraction", "0.3", "--output_dir", str(run)]
    assert train_script.main(args) == 0
    before = {path.name: path.read_bytes() for path in run.glob("checkpoint_*.pth")}
    assert "checkpoint_best.pth" in before
    capsys.readouterr()
    assert train_script.main([*args, "--max_epochs", "1"]) == 1
    assert "holds a run" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in run.glob("checkpoint_*.pth")} == before
    # --overwrite starts afresh; no checkpoint of the old run survives beside the new ones.
    assert train_script.main([*args[:-6], "--val_every", "0", "--val_fraction", "0",
                              "--output_dir", str(run), "--overwrite"]) == 0
    assert sorted(path.name for path in run.glob("checkpoint_*.pth")) == [
        "checkpoint_final.pth", "checkpoint_last.pth"]
    # Bad arguments leave no run folder behind; an output path that is a file is named.
    assert train_script.main([*args[:-1], str(tmp_path / "new"), "--base_lr", "inf"]) == 1
    assert not (tmp_path / "new").exists()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert train_script.main([*args[:-1], str(blocker)]) == 1
    assert f"{blocker}: is a file" in capsys.readouterr().err


def test_ctrl_c_ends_every_command_with_a_message_and_code_130(processed_root, tmp_path,
                                                               monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_script, "train", interrupted)
    code = train_script.main(["--model", "transunet", "--vit_name", "tiny", "--root_path",
                              str(processed_root), "--output_dir", str(tmp_path / "run")])
    assert code == 130
    assert "interrupted" in capsys.readouterr().err
    monkeypatch.setattr(test_script, "checkpoint_paths", interrupted)
    assert test_script.main(["--checkpoint", "x.pth"]) == 130
    monkeypatch.setattr(preprocess_data, "run_preprocessing", interrupted)
    assert preprocess_data.main(["--raw_root", str(tmp_path)]) == 130
    assert "rerun the same command" in capsys.readouterr().err
