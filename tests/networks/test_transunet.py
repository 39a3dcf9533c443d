from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from networks import (
    TransUNet,
    TransUNetDecoder,
    TransUNetEncoder,
    backbone_config,
    create_transunet,
)
from networks.configs import DecoderConfig


@pytest.mark.parametrize("img_size", [32, 64, 128])
def test_logit_shape(img_size: int) -> None:
    model = create_transunet("tiny", img_size=img_size, in_channels=3, num_classes=4)
    assert model(torch.randn(2, 3, img_size, img_size)).shape == (2, 4, img_size, img_size)


@pytest.mark.parametrize("img_size", [40, 8, 0])
def test_img_size_not_multiple_of_16_raises(img_size: int) -> None:
    with pytest.raises(ValueError, match="img_size"):
        create_transunet("tiny", img_size=img_size)


@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (1, 1, 64, 64), (1, 3, 64, 48), (3, 64, 64)])
def test_input_not_matching_the_config_raises(tiny_model: TransUNet, shape) -> None:
    with pytest.raises(ValueError, match="expected input"):
        tiny_model(torch.randn(*shape))


def test_encoder_features_and_skip_order(tiny_model: TransUNet) -> None:
    features, skips = tiny_model.encoder(torch.randn(2, 3, 64, 64))
    assert features.shape == (2, 32, 4, 4)
    # Highest resolution first: root (H/2), stage 1 (H/4), stage 2 (H/8).
    assert [tuple(s.shape) for s in skips] == [(2, 8, 32, 32), (2, 32, 16, 16), (2, 64, 8, 8)]
    assert tiny_model.encoder.skip_channels == (8, 32, 64)
    assert tiny_model.encoder.out_channels == 32


def test_single_channel_encoder_from_config() -> None:
    config = backbone_config("tiny", img_size=32, in_channels=3)
    encoder = TransUNetEncoder.from_config(config, in_channels=1)
    features, _ = encoder(torch.randn(1, 1, 32, 32))
    assert features.shape == (1, 32, 2, 2)


def test_gradients_reach_every_parameter(tiny_model: TransUNet) -> None:
    tiny_model.train()
    x = torch.randn(2, 3, 64, 64)
    target = torch.randint(0, 4, (2, 64, 64))
    loss = F.cross_entropy(tiny_model(x), target)
    loss.backward()
    assert torch.isfinite(loss)
    no_grad = [n for n, p in tiny_model.named_parameters() if p.grad is None]
    zero_grad = [n for n, p in tiny_model.named_parameters()
                 if p.grad is not None and not p.grad.abs().sum() > 0]
    assert no_grad == [] and zero_grad == []


@pytest.mark.parametrize("n_skip", [0, 1, 2])
def test_fewer_skips(n_skip: int) -> None:
    config = backbone_config("tiny", img_size=32)
    config = dataclasses.replace(
        config, decoder=dataclasses.replace(config.decoder, n_skip=n_skip)
    )
    model = TransUNet(config, name="tiny")
    used = [block.skip_ch for block in model.decoder.blocks]
    assert used == [64, 32, 8, 0][:n_skip] + [0] * (4 - n_skip)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 4, 32, 32)


def test_decoder_accepts_fused_skips_and_checks_them() -> None:
    # A three-encoder fusion network concatenates skips: 3x the channels.
    decoder = TransUNetDecoder(96, (24, 96, 192), DecoderConfig(channels=(32, 16, 8, 8),
                                                                head_channels=16))
    skips = [torch.randn(1, 24, 16, 16), torch.randn(1, 96, 8, 8), torch.randn(1, 192, 4, 4)]
    assert decoder(torch.randn(1, 96, 2, 2), skips).shape == (1, 8, 32, 32)
    with pytest.raises(ValueError, match="skip must be"):
        decoder(torch.randn(1, 96, 2, 2), skips[::-1])
    with pytest.raises(ValueError, match="expected 3 skips"):
        decoder(torch.randn(1, 96, 2, 2), skips[:2])
    with pytest.raises(ValueError, match="skip_channels"):
        TransUNetDecoder(96, (24, 96), DecoderConfig())


def test_model_keeps_config_and_name(tiny_model: TransUNet) -> None:
    assert tiny_model.name == "tiny"
    assert tiny_model.config == backbone_config("tiny", img_size=64)
    with pytest.raises(ValueError, match="name"):
        TransUNet(tiny_model.config, name="")
