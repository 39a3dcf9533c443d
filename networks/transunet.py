"""TransUNet assembled from separable parts: hybrid encoder, cascaded decoder, head.

Skip convention used throughout: the encoder returns its skips ordered from the HIGHEST to the
LOWEST resolution, ``[root (H/2), stage1 (H/4), stage2 (H/8)]``, like ``ResNetV2``'s features.
The decoder climbs from H/16 back to H and so consumes them in reverse: its first block (output
H/8) takes ``skips[2]``, the second ``skips[1]``, the third ``skips[0]``; only the first
``n_skip`` blocks take one. Keeping the parts separate lets a multi-encoder network (one encoder
per MR sequence) fuse skips and features before sharing one decoder.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from networks.capabilities import Capabilities
from networks.configs import (
    NUM_SKIPS,
    DecoderConfig,
    ResNetConfig,
    TransUNetConfig,
    ViTConfig,
)
from networks.resnet_v2 import ResNetV2
from networks.vit import VisionTransformer


class TransUNetEncoder(nn.Module):
    """ResNet stem + ViT for square ``img_size`` inputs with ``in_channels`` channels.

    ``forward(x)`` returns ``(features [B, hidden, H/16, W/16], skips)`` with skips ordered from
    highest to lowest resolution (see the module docstring); channels in ``skip_channels``.
    """

    def __init__(
        self, resnet: ResNetConfig, vit: ViTConfig, *, img_size: int, in_channels: int
    ) -> None:
        super().__init__()
        # Validation of img_size/in_channels/patch size lives in one place: the bundle config.
        checked = TransUNetConfig(
            resnet=resnet, vit=vit, img_size=img_size, in_channels=in_channels
        )
        self.img_size = checked.img_size
        self.in_channels = checked.in_channels
        self.resnet = ResNetV2(resnet, in_channels)
        self.vit = VisionTransformer(vit, resnet.out_channels, checked.grid_size)

    @classmethod
    def from_config(
        cls, config: TransUNetConfig, in_channels: int | None = None
    ) -> TransUNetEncoder:
        """Encoder of ``config``; ``in_channels`` overrides it (e.g. 1 per MR sequence)."""
        return cls(
            config.resnet,
            config.vit,
            img_size=config.img_size,
            in_channels=config.in_channels if in_channels is None else in_channels,
        )

    @property
    def out_channels(self) -> int:
        return self.vit.config.hidden_size

    @property
    def skip_channels(self) -> tuple[int, int, int]:
        """Skip channels, highest resolution first (root, stage 1, stage 2)."""
        return self.resnet.config.skip_channels

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        expected = (self.in_channels, self.img_size, self.img_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected input [B, {', '.join(map(str, expected))}], got "
                             f"{tuple(x.shape)}")
        *skips, deepest = self.resnet(x)
        return self.vit(deepest), skips


class Conv2dNormReLU(nn.Sequential):
    """3x3 conv (no bias: the BatchNorm shift replaces it) -> BatchNorm -> ReLU."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class DecoderBlock(nn.Module):
    """x2 bilinear upsampling, optional skip concatenation, two conv-norm-ReLU layers."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int) -> None:
        super().__init__()
        self.skip_ch = skip_ch
        self.conv1 = Conv2dNormReLU(in_ch + skip_ch, out_ch)
        self.conv2 = Conv2dNormReLU(out_ch, out_ch)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        if (skip is None) != (self.skip_ch == 0):
            raise ValueError(f"block built for {self.skip_ch} skip channels got "
                             f"{'no skip' if skip is None else 'a skip'}")
        if skip is not None:
            if skip.shape[1] != self.skip_ch or skip.shape[-2:] != x.shape[-2:]:
                raise ValueError(
                    f"skip must be [B, {self.skip_ch}, {x.shape[-2]}, {x.shape[-1]}], got "
                    f"{tuple(skip.shape)}"
                )
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class TransUNetDecoder(nn.Module):
    """Cascaded upsampler from [B, hidden, H/16, W/16] to [B, channels[-1], H, W].

    ``skip_channels`` lists the encoder skips highest resolution first (as the encoder returns
    them); a fusion network may pass larger counts, e.g. concatenated skips of three encoders.
    """

    def __init__(
        self, hidden_size: int, skip_channels: Sequence[int], config: DecoderConfig
    ) -> None:
        super().__init__()
        if not isinstance(config, DecoderConfig):
            raise ValueError(f"config must be a DecoderConfig, got {type(config).__name__}")
        skip_channels = tuple(skip_channels)
        if len(skip_channels) != NUM_SKIPS or any(c < 1 for c in skip_channels):
            raise ValueError(
                f"skip_channels must be {NUM_SKIPS} positive ints (H/2, H/4, H/8), got "
                f"{skip_channels}"
            )
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
        self.config = config
        self.skip_channels = skip_channels
        self.conv_more = Conv2dNormReLU(hidden_size, config.head_channels)
        in_chs = (config.head_channels, *config.channels[:-1])
        deepest_first = skip_channels[::-1]
        used = [deepest_first[i] if i < config.n_skip else 0 for i in range(len(in_chs))]
        self.blocks = nn.ModuleList(
            DecoderBlock(i, s, o) for i, s, o in zip(in_chs, used, config.channels, strict=True)
        )

    @property
    def out_channels(self) -> int:
        return self.config.channels[-1]

    def forward(self, x: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(skips) != NUM_SKIPS:
            raise ValueError(f"expected {NUM_SKIPS} skips (highest resolution first), got "
                             f"{len(skips)}")
        deepest_first = list(skips)[::-1]
        x = self.conv_more(x)
        for i, block in enumerate(self.blocks):
            x = block(x, deepest_first[i] if i < self.config.n_skip else None)
        return x


class SegmentationHead(nn.Conv2d):
    """3x3 conv from decoder channels to per-class logits."""

    def __init__(self, in_channels: int, num_classes: int, kernel_size: int = 3) -> None:
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size}")
        super().__init__(in_channels, num_classes, kernel_size, padding=kernel_size // 2)


class TransUNet(nn.Module):
    """Early-fusion TransUNet: the MR sequences are stacked as input channels.

    ``config`` and ``name`` are kept on the module so checkpoints can rebuild it
    (see :func:`networks.backbones.transunet_from_config`).
    """

    variant = "transunet"
    capabilities = Capabilities()

    def __init__(self, config: TransUNetConfig, name: str = "custom") -> None:
        super().__init__()
        if not isinstance(config, TransUNetConfig):
            raise ValueError(f"config must be a TransUNetConfig, got {type(config).__name__}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        self.config = config
        self.name = name
        self.encoder = TransUNetEncoder.from_config(config)
        self.decoder = TransUNetDecoder(
            self.encoder.out_channels, self.encoder.skip_channels, config.decoder
        )
        self.segmentation_head = SegmentationHead(self.decoder.out_channels, config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features, skips = self.encoder(x)
        return self.segmentation_head(self.decoder(features, skips))

