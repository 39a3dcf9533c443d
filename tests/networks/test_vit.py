from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from networks.configs import ViTConfig
from networks.vit import MultiHeadAttention, VisionTransformer

CONFIG = ViTConfig(hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64)


def test_output_is_a_feature_map_of_the_grid() -> None:
    vit = VisionTransformer(CONFIG, in_channels=128, grid_size=4).eval()
    assert vit(torch.randn(2, 128, 4, 4)).shape == (2, 32, 4, 4)
    assert vit.embeddings.position_embeddings.shape == (1, 16, 32)
    assert vit.embeddings.patch_embeddings.kernel_size == (1, 1)


def test_wrong_grid_raises() -> None:
    vit = VisionTransformer(CONFIG, in_channels=128, grid_size=4)
    with pytest.raises(ValueError, match="4x4"):
        vit(torch.randn(1, 128, 2, 2))


def test_attention_matches_the_textbook_formula() -> None:
    torch.manual_seed(0)
    attn = MultiHeadAttention(CONFIG).eval()
    x = torch.randn(2, 5, 32)
    heads, dim = CONFIG.num_heads, CONFIG.head_dim

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(2, 5, heads, dim).permute(0, 2, 1, 3)

    q, k, v = split(attn.query(x)), split(attn.key(x)), split(attn.value(x))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dim), dim=-1)
    expected = attn.out((weights @ v).permute(0, 2, 1, 3).reshape(2, 5, 32))
    torch.testing.assert_close(attn(x), expected)


def test_eval_is_deterministic_and_train_uses_dropout() -> None:
    torch.manual_seed(0)
    vit = VisionTransformer(dataclasses.replace(CONFIG, dropout_rate=0.5), 16, 2)
    x = torch.randn(1, 16, 2, 2)
    vit.eval()
    torch.testing.assert_close(vit(x), vit(x))
    vit.train()
    assert not torch.allclose(vit(x), vit(x))
