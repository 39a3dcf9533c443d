"""train.py -> test.py on a tiny processed dataset, plus the scripts' error handling."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import preprocess_data
import test as test_script
import train as train_script
from datasets.labels import EVAL_GROUPS, MODALITIES
from datasets.processed import ProcessedLayout, write_test_volume, write_training_slice
from evaluation.evaluate import load_checkpoint
from prompts.bank import PriorBank, save_prior_bank
from prompts.texts import canonical_names
from trainer import CHECKPOINT_FINAL, CHECKPOINT_LAST, TrainConfig, poly_lr


def _ring(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A myocardium-like ring with a scar and an edema sector, and sequence-like contrasts."""
    y, x = np.mgrid[:size, :size] - (size - 1) / 2 + rng.uniform(-3, 3, size=2)[:, None, None]
    radius, angle = np.hypot(y, x), np.arctan2(y, x)
    label = np.zeros((size, size), np.uint8)
    ring = (radius > size * 0.18) & (radius < size * 0.3)
    label[ring] = 1
    label[ring & (angle > 0) & (angle < 1.2)] = 2
    label[ring & (angle >= 1.2) & (angle < 2.2)] = 3
    bssfp = np.where(radius <= size * 0.18, 230, np.where(ring, 60, 120))
    lge = np.where(label == 2, 240, np.where(ring, 20, 110))
    t2w = np.where(label >= 2, 220, np.where(ring, 90, 40))
    image = np.stack([bssfp, lge, t2w]).astype(np.float32) + rng.normal(0, 5, (3, size, size))
    return np.clip(image, 0, 255), label


@pytest.fixture(scope="module")
def processed_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("processed")
    layout = ProcessedLayout(root)
    rng = np.random.default_rng(0)
    for index in range(6):
        image, label = _ring(32, rng)
        for channel, modality in enumerate(MODALITIES):
            write_training_slice(layout.item_path(modality, "train", f"case0001_slice{index:03d}"),
                                 image[channel], label)
    for case in ("case0005", "case0010"):
        slices = [_ring(32, rng) for _ in range(3)]
        labels = np.stack([label for _, label in slices])
        for channel, modality in enumerate(MODALITIES):
            write_test_volume(layout.item_path(modality, "test_vol", case),
                              np.stack([image[channel] for image, _ in slices]), labels,
                              (10.0, 1.0, 1.0))
    return root


@pytest.fixture(scope="module")
def bank_path(tmp_path_factory):
    """A small prior bank (random unit rows): the plumbing test needs names, not meaning."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.nn.functional.normalize(torch.randn(len(canonical_names()), 16,
                                                     generator=generator), dim=1)
    bank = PriorBank("test/random", "0" * 64, dict(zip(canonical_names(), rows, strict=True)))
    return save_prior_bank(bank, tmp_path_factory.mktemp("priors") / "bank.pt")


def test_poly_lr_known_values():
    assert poly_lr(1e-3, 0, 100, 0.9) == pytest.approx(1e-3)
    assert poly_lr(1e-3, 50, 100, 0.9) == pytest.approx(1e-3 * 0.5**0.9)
    assert poly_lr(1e-3, 100, 100, 0.9) == 0.0


@pytest.mark.parametrize("change", [
    {"vit_name": "R99"}, {"img_size": 120}, {"batch_size": 0}, {"dataset": "Synapse"},
    {"base_lr": 0.0}, {"model": "unet"},
    {"model": "transunet", "priors_path": "bank.pt"}, {"model": "transunet", "aux_weight": -1.0},
    {"model": "transunet", "temperature": 0.0}, {"class_weights": (1.0, 2.0)}])
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
                              "--contrastive_start_epoch", "1", *priors])
    assert code == 0
    config = json.loads((run / "config.json").read_text())
    assert config["vit_name"] == "tiny" and config["max_epochs"] == 2
    assert config["model"] == variant
    payload = torch.load(run / CHECKPOINT_FINAL, weights_only=False)
    assert payload["epoch"] == 2 and payload["iteration"] == 4  # 6 slices / batch 3 x 2 epochs
    assert payload["train_config"] == config
    assert (run / CHECKPOINT_LAST).is_file() and (run / "tensorboard").is_dir()

    assert payload["network"]["variant"] == variant
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


def test_training_starts_from_a_google_layout_npz(processed_root, tmp_path):
    from networks.factory import create_model
    from networks.npz_loader import write_google_npz

    source = create_model("tiny", img_size=64, in_channels=3, num_classes=4)
    weights = write_google_npz(source.encoder, tmp_path / "R50+ViT-tiny.npz")
    run = tmp_path / "run"
    args = ["--model", "transunet", "--vit_name", "tiny", "--root_path", str(processed_root),
            "--img_size", "32",
            "--batch_size", "6", "--max_epochs", "1", "--num_workers", "0", "--output_dir",
            str(run), "--base_lr", "1e-12", "--no_augment", "--pretrained_path", str(weights)]
    assert train_script.main(args) == 0
    trained = torch.load(run / CHECKPOINT_FINAL, weights_only=False)["model"]
    # With a vanishing learning rate the encoder still holds the file's ResNet weights.
    root_key = next(k for k in trained if k.startswith("encoder.") and k.endswith("conv.weight"))
    assert torch.allclose(trained[root_key], source.state_dict()[root_key], atol=1e-6)
    assert train_script.main([*args[:-1], str(tmp_path / "missing.npz")]) == 1
