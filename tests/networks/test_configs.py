from __future__ import annotations

import dataclasses
import json

import pytest

from networks.configs import DecoderConfig, ResNetConfig, TransUNetConfig, ViTConfig


def test_defaults_are_the_paper_model() -> None:
    config = TransUNetConfig()
    assert config.resnet.block_units == (3, 4, 9)
    assert config.resnet.skip_channels == (64, 256, 512)
    assert config.resnet.out_channels == 1024
    assert (config.vit.hidden_size, config.vit.num_layers, config.vit.num_heads) == (768, 12, 12)
    assert config.decoder.channels == (256, 128, 64, 16)
    assert config.grid_size == 14


def test_to_dict_from_dict_round_trip_through_json() -> None:
    config = TransUNetConfig(
        resnet=ResNetConfig(block_units=(1, 2, 3), width=16, gn_groups=8),
        vit=ViTConfig(hidden_size=64, num_layers=3, num_heads=4, mlp_dim=96, dropout_rate=0.2),
        decoder=DecoderConfig(channels=(32, 16, 8, 4), n_skip=2, head_channels=48),
        img_size=96,
        in_channels=1,
        num_classes=5,
    )
    restored = TransUNetConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    assert isinstance(restored.resnet.block_units, tuple)


def test_from_dict_rejects_unknown_keys() -> None:
    data = TransUNetConfig().to_dict()
    data["vit"]["hiden_size"] = 12
    with pytest.raises(ValueError, match="hiden_size"):
        TransUNetConfig.from_dict(data)
    with pytest.raises(ValueError, match="colour"):
        TransUNetConfig.from_dict({"colour": 1})


def test_configs_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        TransUNetConfig().img_size = 32  # type: ignore[misc]


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: TransUNetConfig(img_size=40), "multiple of 16"),
        (lambda: TransUNetConfig(img_size=0), "img_size"),
        (lambda: TransUNetConfig(in_channels=0), "in_channels"),
        (lambda: TransUNetConfig(num_classes=True), "num_classes"),
        (lambda: TransUNetConfig(vit=ViTConfig(patch_size=8)), "patch_size"),
        (lambda: TransUNetConfig(resnet={"width": 64}), "ResNetConfig"),
        (lambda: ResNetConfig(width=8, gn_groups=32), "gn_groups"),
        (lambda: ResNetConfig(block_units=(3, 4)), "block_units"),
        (lambda: ResNetConfig(block_units=(3, 0, 9)), "block_units"),
        (lambda: ViTConfig(hidden_size=100, num_heads=12), "num_heads"),
        (lambda: ViTConfig(dropout_rate=1.0), "dropout_rate"),
        (lambda: ViTConfig(attention_dropout_rate=-0.1), "attention_dropout_rate"),
        (lambda: DecoderConfig(channels=(256, 128, 64)), "channels"),
        (lambda: DecoderConfig(n_skip=4), "n_skip"),
        (lambda: DecoderConfig(head_channels=0), "head_channels"),
    ],
)
def test_bad_values_raise(factory, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        factory()
