"""Sequence dropout in training: config checks, what the network is fed, resume compatibility."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from torch.utils.data import DistributedSampler

import training.step
from commands.train import build_parser, settings_of
from datasets.dataset import SliceDataset
from datasets.processed import ProcessedLayout
from networks.checkpoint import CHECKPOINT_LAST, load_training_checkpoint
from networks.objective import TrainingForward
from tests.helpers import write_ring_dataset
from trainer import TrainConfig, train

_FED: list[tuple[torch.Tensor, torch.Tensor | None]] = []


class _Recorder(TrainingForward):
    """TrainingForward that keeps what each step fed the network (in ``_FED``)."""

    def forward(self, images, sequence_mask=None):
        _FED.append((images.detach().clone(), sequence_mask))
        return super().forward(images, sequence_mask)


def _config(root, out, **changes) -> TrainConfig:
    values = dict(model="immseg_noprior", vit_name="tiny", root_path=str(root),
                  output_dir=str(out), img_size=32, batch_size=4, max_epochs=1, num_workers=0,
                  device="cpu", val_every=0, val_fraction=0.0, seed=2, sequence_dropout=0.6)
    values.update(changes)
    return TrainConfig(**values)


def _expected_masks(config: TrainConfig) -> torch.Tensor:
    """The masks of every step of a one-process run, from the dataset and the shuffle alone."""
    layout = ProcessedLayout(Path(config.root_path))
    dataset = SliceDataset(layout, layout.names("train", create=False), config.img_size,
                           seed=config.seed, sequence_dropout=config.sequence_dropout)
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, seed=config.seed)
    masks = []
    for epoch in range(config.max_epochs):
        sampler.set_epoch(epoch)
        masks += [dataset[(epoch, index)]["sequence_mask"] for index in sampler]
    return torch.stack(masks)


@pytest.mark.parametrize("model", ["immseg_noprior", "transunet"])
def test_the_network_sees_zeroed_channels_and_the_fusion_variants_the_mask(tmp_path, monkeypatch,
                                                                           model):
    root = write_ring_dataset(tmp_path / "data", train_cases=4, slices_per_case=4)
    monkeypatch.setattr(training.step, "TrainingForward", _Recorder)
    _FED.clear()
    # A persistent worker over two epochs: each epoch must draw its own masks.
    config = _config(root, tmp_path / "run", model=model, max_epochs=2, num_workers=1)
    train(config)
    assert len(_FED) == 8  # 16 slices / batch 4 x 2 epochs
    images = torch.cat([images for images, _ in _FED])
    # The ring slices have no all-zero channel, so an empty channel is a dropped one.
    empty = images.flatten(2).eq(0).all(dim=2)
    expected = _expected_masks(config)
    assert torch.equal(~empty, expected)
    assert empty.any() and not empty.all(dim=1).any()
    assert not torch.equal(expected[:16].sum(0), expected[16:].sum(0))  # epochs differ
    if model == "transunet":  # early fusion: zeroed channels only
        assert all(mask is None for _, mask in _FED)
    else:
        masks = torch.cat([mask for _, mask in _FED])
        assert masks.dtype == torch.bool and torch.equal(masks, expected)


def test_config_validates_sequence_dropout_and_the_flag_reaches_it(tmp_path):
    for bad in (1.0, -0.1, float("nan"), True):
        with pytest.raises(ValueError, match="sequence_dropout"):
            _config(tmp_path, tmp_path, sequence_dropout=bad)
    with pytest.raises(ValueError, match="transunet_single"):
        _config(tmp_path, tmp_path, model="transunet_single")
    assert _config(tmp_path, tmp_path, model="transunet_single", sequence_dropout=0.0)
    args = build_parser().parse_args(["--sequence_dropout", "0.3"])
    assert args.sequence_dropout == 0.3
    defaults = settings_of(build_parser().parse_args([]))
    assert TrainConfig(**defaults).sequence_dropout == TrainConfig().sequence_dropout == 0


def test_resume_accepts_a_checkpoint_older_than_the_field_but_not_another_rate(tmp_path):
    config = _config(tmp_path, tmp_path, sequence_dropout=0.0)
    saved = config.to_dict()
    del saved["sequence_dropout"]  # as written before sequence dropout existed
    path = tmp_path / CHECKPOINT_LAST
    torch.save({"format_version": 2, "network": {}, "model": {}, "optimizer": {}, "scaler": {},
                "epoch": 1, "iteration": 4, "train_config": saved, "rng": {}}, path)
    defaults = TrainConfig.field_defaults()
    assert load_training_checkpoint(path, config.to_dict(), defaults=defaults)["epoch"] == 1
    dropping = dataclasses.replace(config, sequence_dropout=0.5)
    with pytest.raises(ValueError, match=re.escape("sequence_dropout: 0.0 -> 0.5")):
        load_training_checkpoint(path, dropping.to_dict(), defaults=defaults)
    with pytest.raises(ValueError, match="sequence_dropout"):  # no defaults: the old strictness
        load_training_checkpoint(path, config.to_dict())
