from __future__ import annotations

import pytest
import torch

from networks import (
    TransUNetConfig,
    backbone_config,
    create_transunet,
    list_backbones,
    register_backbone,
    transunet_from_config,
)


def expected_param_count(config: TransUNetConfig) -> int:
    """Parameters derived from the architecture description, independently of the modules."""
    r, v, d = config.resnet, config.vit, config.decoder
    total = 7 * 7 * config.in_channels * r.width + 2 * r.width  # root conv + GroupNorm
    in_ch = r.width
    for stage, units in enumerate(r.block_units):
        mid, out = r.width * 2**stage, 4 * r.width * 2**stage
        for unit in range(units):
            total += in_ch * mid + 9 * mid * mid + mid * out + 2 * (mid + mid + out)
            if unit == 0:  # projection shortcut (channels or stride change)
                total += in_ch * out + 2 * out
            in_ch = out
    h, m = v.hidden_size, v.mlp_dim
    total += in_ch * h + h + config.grid_size**2 * h  # 1x1 patch embedding, positions
    total += v.num_layers * (2 * 2 * h + 4 * (h * h + h) + (h * m + m) + (m * h + h))
    total += 2 * h  # final LayerNorm
    total += 9 * h * d.head_channels + 2 * d.head_channels  # conv (no bias) + BatchNorm
    skips = r.skip_channels[::-1]
    in_ch = d.head_channels
    for i, out in enumerate(d.channels):
        skip = skips[i] if i < d.n_skip else 0
        total += 9 * (in_ch + skip) * out + 2 * out + 9 * out * out + 2 * out
        in_ch = out
    return total + 9 * in_ch * config.num_classes + config.num_classes


def test_registered_variants() -> None:
    assert {"R50-ViT-B_16", "R50-ViT-L_16", "R26-ViT-S_16", "tiny"} <= set(list_backbones())
    large = backbone_config("R50-ViT-L_16")
    assert (large.vit.hidden_size, large.vit.num_layers, large.vit.num_heads) == (1024, 24, 16)
    small = backbone_config("R26-ViT-S_16")
    assert small.resnet.block_units == (2, 2, 2) and small.vit.hidden_size == 384


def test_unknown_name_lists_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'R50-ViT-X'.*R50-ViT-B_16"):
        create_transunet("R50-ViT-X")


def test_duplicate_registration_raises() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("tiny")(lambda **_: None)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["tiny", "R26-ViT-S_16"])
def test_param_count_matches_derivation(name: str) -> None:
    model = create_transunet(name, img_size=64, in_channels=2, num_classes=3)
    assert sum(p.numel() for p in model.parameters()) == expected_param_count(model.config)


def test_full_paper_model() -> None:
    model = create_transunet("R50-ViT-B_16", img_size=128, in_channels=3, num_classes=4).eval()
    count = sum(p.numel() for p in model.parameters())
    assert count == expected_param_count(model.config)
    assert 100e6 < count < 110e6  # ~105 M, as published for TransUNet
    with torch.no_grad():
        assert model(torch.randn(1, 3, 128, 128)).shape == (1, 4, 128, 128)


def test_rebuild_from_checkpoint_fields(tiny_model) -> None:
    tiny_model.eval()
    saved = {"name": tiny_model.name, "config": tiny_model.config.to_dict(),
             "state": tiny_model.state_dict()}
    rebuilt = transunet_from_config(saved["name"], saved["config"])
    rebuilt.load_state_dict(saved["state"])
    rebuilt.eval()
    x = torch.randn(1, 3, 64, 64)
    assert rebuilt.name == "tiny" and rebuilt.config == tiny_model.config
    torch.testing.assert_close(rebuilt(x), tiny_model(x), rtol=0, atol=0)
