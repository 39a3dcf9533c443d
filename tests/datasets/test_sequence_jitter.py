"""Per-sequence misalignment in training: bSSFP and T2w move, LGE and the label do not."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import torch

from commands.train import build_parser, settings_of
from datasets.dataset import SliceDataset
from datasets.misalignment import sample_slice_misalignment, warp_slice
from datasets.processed import ProcessedLayout
from datasets.sequence_jitter import JITTER_MISALIGNMENT, JitterConfig, jitter_sequences
from networks.checkpoint import CHECKPOINT_LAST, load_training_checkpoint
from tests.helpers import ring_slice, write_ring_dataset
from trainer import TrainConfig, _training_data
from training.distributed import DistContext


def _slice(size: int = 64) -> np.ndarray:
    image, _ = ring_slice(size, np.random.default_rng(0))
    return image / 255.0


def test_moving_sequences_are_warped_by_their_own_record_and_lge_is_untouched():
    image = _slice()
    out, records = jitter_sequences(image, JitterConfig(probability=1.0),
                                    np.random.default_rng(3))
    assert sorted(records) == ["T2w", "bSSFP"]
    np.testing.assert_array_equal(out[1], image[1].astype(np.float32))  # LGE: the label's
    for channel, name in ((0, "bSSFP"), (2, "T2w")):
        expected = np.clip(warp_slice(image[channel].astype(np.float32), (1.0, 1.0),
                                      records[name], is_label=False), 0, 1)
        np.testing.assert_allclose(out[channel], expected, atol=1e-6)
        assert np.abs(out[channel] - image[channel]).max() > 0.1
        assert out[channel].min() >= 0.0 and out[channel].max() <= 1.0
    # Independent draws: the two sequences move differently.
    assert records["bSSFP"]["rotation_deg"] != records["T2w"]["rotation_deg"]
    # Within the configured model: rotation <= 8 degrees, shift <= 5 mm, scale within 5 %.
    for record in records.values():
        assert abs(record["rotation_deg"]) <= 8.0 and abs(record["scale"] - 1) <= 0.05
        assert np.hypot(*record["translation_mm"]) <= 5.0


def test_probability_zero_is_the_identity_and_bad_settings_are_refused():
    image = _slice()
    out, records = jitter_sequences(image, JitterConfig(probability=0.0),
                                    np.random.default_rng(0))
    np.testing.assert_array_equal(out, image.astype(np.float32))
    assert not records
    for bad in (-0.1, 1.5, True):
        with pytest.raises(ValueError, match="probability"):
            JitterConfig(probability=bad)
    with pytest.raises(ValueError, match="fixed"):
        JitterConfig(fixed="T1")


def test_the_dataset_jitters_reproducibly_and_leaves_the_label(tmp_path):
    root = write_ring_dataset(tmp_path, train_cases=1, slices_per_case=2, size=48)
    layout = ProcessedLayout(root)
    names = layout.names("train")
    plain = SliceDataset(layout, names, 48, seed=4)
    jittered = SliceDataset(layout, names, 48, seed=4, jitter=JitterConfig(probability=1.0))
    a, b = plain[(0, 1)], jittered[(0, 1)]
    assert (a["label"] == b["label"]).all() and (a["image"][1] == b["image"][1]).all()
    assert not (a["image"][0] == b["image"][0]).all()
    again = SliceDataset(layout, names, 48, seed=4, jitter=JitterConfig(probability=1.0))
    assert (again[(0, 1)]["image"] == b["image"]).all()  # a function of (seed, epoch, index)
    assert not (jittered[(1, 1)]["image"] == b["image"]).all()  # another epoch, another draw


def test_immseg_trains_with_jitter_by_default_and_runs_from_before_still_resume(tmp_path):
    """The default is the variant's (networks.variants: immseg and its ablation 0.5, the
    others 0); an explicit value wins; a config or checkpoint written before the field existed
    meant no jitter: ``--config`` gives it back without, and resuming it refuses the new
    default."""

    def from_flags(*flags: str) -> TrainConfig:
        return TrainConfig(**settings_of(build_parser().parse_args(list(flags))))

    resolved = {model: from_flags("--model", model).sequence_jitter
                for model in ("immseg", "immseg_noprior", "transunet", "transunet_single",
                              "immseg_released")}
    assert resolved == {"immseg": 0.5, "immseg_noprior": 0.5, "transunet": 0.0,
                        "transunet_single": 0.0, "immseg_released": 0.0}
    assert from_flags("--sequence_jitter", "0").sequence_jitter == 0.0  # immseg, by flag
    assert TrainConfig(model="transunet", sequence_jitter=0.2).sequence_jitter == 0.2
    with pytest.raises(ValueError, match="transunet_single reads one sequence"):
        TrainConfig(model="transunet_single", sequence="bSSFP", sequence_jitter=0.5)

    root = write_ring_dataset(tmp_path, train_cases=1, slices_per_case=2, size=48)
    config = TrainConfig(model="immseg_noprior", vit_name="tiny", root_path=str(root),
                         output_dir=str(tmp_path / "run"), img_size=48, num_workers=0)
    layout = ProcessedLayout(root)
    data = _training_data(config, DistContext(torch.device("cpu")), layout,
                          layout.names("train"))
    assert data.dataset.jitter == JitterConfig(0.5)  # the default reaches the slices

    saved = dataclasses.replace(config, sequence_jitter=0.0).to_dict()
    del saved["sequence_jitter"]  # as written before the option existed
    old_json, new_json = tmp_path / "old.json", tmp_path / "new.json"
    old_json.write_text(json.dumps(saved))
    new_json.write_text(json.dumps(config.to_dict()))
    assert from_flags("--config", str(old_json)).sequence_jitter == 0.0  # what that run did
    assert from_flags("--config", str(new_json)).sequence_jitter == 0.5
    assert from_flags("--config", str(old_json), "--sequence_jitter", "1").sequence_jitter == 1
    path = tmp_path / CHECKPOINT_LAST
    torch.save({"format_version": 2, "network": {}, "model": {}, "optimizer": {}, "scaler": {},
                "epoch": 1, "iteration": 4, "train_config": saved, "rng": {}}, path)
    old = TrainConfig.field_defaults()
    without = dataclasses.replace(config, sequence_jitter=0.0).to_dict()
    assert load_training_checkpoint(path, without, defaults=old)["epoch"] == 1
    with pytest.raises(ValueError, match=re.escape("sequence_jitter: 0.0 -> 0.5")):
        load_training_checkpoint(path, config.to_dict(), defaults=old)


def test_jitter_strength_scales_every_magnitude_of_the_warp_model():
    half = JitterConfig(1.0, JITTER_MISALIGNMENT.scaled(0.5)).misalignment
    assert (half.max_rotation_deg, half.max_translation_mm, half.max_scale, half.nonrigid_mm) \
        == (4.0, 2.5, 0.025, 0.75)
    assert (half.nonrigid_grid_mm, half.reach_mm) == (JITTER_MISALIGNMENT.nonrigid_grid_mm,
                                                      JITTER_MISALIGNMENT.reach_mm)
    config = TrainConfig(model="immseg", sequence_jitter=1.0, jitter_strength=0.5)
    assert config.jitter() == JitterConfig(1.0, half)
    assert TrainConfig(model="immseg").jitter() == JitterConfig(0.5)  # strength 1: the model
    for bad in (0, -0.5, 10, True):
        with pytest.raises(ValueError, match="jitter_strength"):
            TrainConfig(model="immseg", jitter_strength=bad)
    with pytest.raises(ValueError, match="has no effect without sequence_jitter"):
        TrainConfig(model="transunet", jitter_strength=0.5)  # its jitter defaults to 0
    with pytest.raises(ValueError, match="strength"):
        JITTER_MISALIGNMENT.scaled(10)
    # The draws shrink with the model: shifts of a half-strength model stay within 2.5 mm.
    rng = np.random.default_rng(0)
    xs = ys = np.arange(64.0)
    shifts = [np.hypot(*sample_slice_misalignment(rng, (32.0, 32.0), xs, ys, half)[0]
                       ["translation_mm"]) for _ in range(200)]
    assert 2.0 < max(shifts) <= 2.5
