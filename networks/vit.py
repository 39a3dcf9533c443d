"""Hybrid patch embedding and pre-norm transformer encoder of the R50+ViT hybrid.

Parameter names follow Google's checkpoint structure (separate query/key/value/out projections,
``attention_norm``/``mlp_norm`` for LayerNorm_0/LayerNorm_2) so the npz loader maps one to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from networks.configs import ViTConfig

#: LayerNorm epsilon of the reference implementation.
LN_EPS = 1e-6


class HybridEmbeddings(nn.Module):
    """Tokens from the ResNet's H/16 map: 1x1 conv, learned position embedding, dropout.

    The ResNet already downsamples by the patch size, so each feature pixel is one token.
    """

    def __init__(self, in_channels: int, grid_size: int, config: ViTConfig) -> None:
        super().__init__()
        if in_channels < 1 or grid_size < 1:
            raise ValueError(f"in_channels and grid_size must be >= 1, got {in_channels}, "
                             f"{grid_size}")
        self.grid_size = grid_size
        self.patch_embeddings = nn.Conv2d(in_channels, config.hidden_size, kernel_size=1)
        self.position_embeddings = nn.Parameter(
            torch.zeros(1, grid_size * grid_size, config.hidden_size)
        )
        self.dropout = nn.Dropout(config.dropout_rate)
        nn.init.normal_(self.position_embeddings, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.grid_size, self.grid_size):
            raise ValueError(
                f"expected a {self.grid_size}x{self.grid_size} feature grid, got "
                f"{tuple(x.shape[-2:])}; the position embedding is fixed to img_size"
            )
        tokens = self.patch_embeddings(x).flatten(2).transpose(1, 2)  # [B, N, hidden]
        return self.dropout(tokens + self.position_embeddings)


class MultiHeadAttention(nn.Module):
    """Self-attention over tokens with fused scaled-dot-product kernels."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.attention_dropout_rate = config.attention_dropout_rate
        hidden = config.hidden_size
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        return x.view(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (self._split_heads(proj(x)) for proj in (self.query, self.key, self.value))
        dropout_p = self.attention_dropout_rate if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        return self.out(y.transpose(1, 2).flatten(2))


class MlpBlock(nn.Module):
    """Dense -> GELU -> dropout -> Dense -> dropout."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.mlp_dim)
        self.fc2 = nn.Linear(config.mlp_dim, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(x)))))


class EncoderBlock(nn.Module):
    """Pre-norm residual block: x + Drop(Attn(LN(x))), then x + MLP(LN(x))."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=LN_EPS)
        self.attention = MultiHeadAttention(config)
        self.attention_dropout = nn.Dropout(config.dropout_rate)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=LN_EPS)
        self.mlp = MlpBlock(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention_dropout(self.attention(self.attention_norm(x)))
        return x + self.mlp(self.mlp_norm(x))


class TransformerEncoder(nn.Module):
    """Stack of encoder blocks followed by the final LayerNorm."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderBlock(config) for _ in range(config.num_layers))
        self.encoder_norm = nn.LayerNorm(config.hidden_size, eps=LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.encoder_norm(x)


class VisionTransformer(nn.Module):
    """Hybrid ViT: [B, C, g, g] ResNet features -> [B, hidden, g, g] contextual features."""

    def __init__(self, config: ViTConfig, in_channels: int, grid_size: int) -> None:
        super().__init__()
        if not isinstance(config, ViTConfig):
            raise ValueError(f"config must be a ViTConfig, got {type(config).__name__}")
        self.config = config
        self.embeddings = HybridEmbeddings(in_channels, grid_size, config)
        self.encoder = TransformerEncoder(config)
        self._init_linear()

    def _init_linear(self) -> None:
        # Xavier weights and near-zero biases, as the reference ViT initialises its Dense layers.
        for module in self.encoder.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.normal_(module.bias, std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        tokens = self.encoder(self.embeddings(x))
        return tokens.transpose(1, 2).reshape(batch, self.config.hidden_size, height, width)
