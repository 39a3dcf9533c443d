"""ResNet stem of the R50+ViT hybrid: weight-standardised convs, GroupNorm, skip features.

The layout (module and parameter names included) mirrors Google's R50 hybrid checkpoint so that
``npz_loader`` can map names one to one: ``root.conv``/``root.gn``, then
``stages[s][u].{conv1,gn1,conv2,gn2,conv3,gn3,conv_proj,gn_proj}``.

Padding is symmetric (PyTorch style) everywhere: for any even input the 7x7/2 root conv, the
3x3/2 max-pool and the 3x3/2 convs halve the size exactly, so an input that is a multiple of 16
gives exactly H/2, H/4, H/8 and H/16 features without cropping or zero-filled borders.
(Google's TF "SAME" padding puts the odd padding pixel on the bottom/right instead; with
pretrained weights this shifts features by at most one pixel, which fine-tuning absorbs.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from networks.configs import RESNET_STRIDE, ResNetConfig

#: GroupNorm epsilon of the reference implementation.
GN_EPS = 1e-6


class StdConv2d(nn.Conv2d):
    """Conv2d whose kernel is standardised per output filter on every call.

    Standardising (zero mean, unit variance over in-channels x kernel) pairs with GroupNorm to
    make training independent of batch statistics, which is why the hybrid uses it.
    """

    def __init__(self, *args: object, eps: float = 1e-8, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.eps = eps

    def standardized_weight(self) -> torch.Tensor:
        var, mean = torch.var_mean(self.weight, dim=(1, 2, 3), keepdim=True, unbiased=False)
        return (self.weight - mean) * torch.rsqrt(var + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(
            x, self.standardized_weight(), self.bias, self.stride, self.padding, self.dilation,
            self.groups,
        )


def std_conv(in_ch: int, out_ch: int, kernel_size: int, stride: int = 1) -> StdConv2d:
    """Bias-free weight-standardised conv with symmetric 'same' padding for odd kernels."""
    return StdConv2d(
        in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2, bias=False
    )


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (carries the stride) -> 1x1 bottleneck, GroupNorm after each conv.

    A 1x1 projection (conv_proj + gn_proj) replaces the identity whenever channels or stride
    change; the residual sum is followed by ReLU (post-activation, as in the Google hybrid).
    """

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, stride: int, gn_groups: int) -> None:
        super().__init__()
        for name, ch in (("in_ch", in_ch), ("mid_ch", mid_ch), ("out_ch", out_ch)):
            if ch % gn_groups:
                raise ValueError(f"gn_groups={gn_groups} must divide {name}={ch}")
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        self.conv1 = std_conv(in_ch, mid_ch, 1)
        self.gn1 = nn.GroupNorm(gn_groups, mid_ch, eps=GN_EPS)
        self.conv2 = std_conv(mid_ch, mid_ch, 3, stride=stride)
        self.gn2 = nn.GroupNorm(gn_groups, mid_ch, eps=GN_EPS)
        self.conv3 = std_conv(mid_ch, out_ch, 1)
        self.gn3 = nn.GroupNorm(gn_groups, out_ch, eps=GN_EPS)
        self.conv_proj: StdConv2d | None = None
        self.gn_proj: nn.GroupNorm | None = None
        if stride != 1 or in_ch != out_ch:
            self.conv_proj = std_conv(in_ch, out_ch, 1, stride=stride)
            self.gn_proj = nn.GroupNorm(gn_groups, out_ch, eps=GN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        if self.conv_proj is not None and self.gn_proj is not None:
            shortcut = self.gn_proj(self.conv_proj(x))
        y = F.relu(self.gn1(self.conv1(x)))
        y = F.relu(self.gn2(self.conv2(y)))
        y = self.gn3(self.conv3(y))
        return F.relu(y + shortcut)


class RootBlock(nn.Module):
    """7x7/2 conv + GroupNorm + ReLU; its output (H/2) is the highest-resolution skip."""

    def __init__(self, in_ch: int, width: int, gn_groups: int) -> None:
        super().__init__()
        self.conv = std_conv(in_ch, width, 7, stride=2)
        self.gn = nn.GroupNorm(gn_groups, width, eps=GN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.gn(self.conv(x)))


class ResNetV2(nn.Module):
    """Three-stage GN/StdConv ResNet returning every scale the decoder needs.

    ``forward`` returns ``[root (H/2), stage1 (H/4), stage2 (H/8), stage3 (H/16)]``, i.e. from
    highest to lowest resolution; the last one feeds the transformer, the others are skips.
    """

    def __init__(self, config: ResNetConfig, in_channels: int = 3) -> None:
        super().__init__()
        if not isinstance(config, ResNetConfig):
            raise ValueError(f"config must be a ResNetConfig, got {type(config).__name__}")
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        self.config = config
        self.in_channels = in_channels
        self.root = RootBlock(in_channels, config.width, config.gn_groups)
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.stages = nn.ModuleList()
        in_ch = config.width
        for stage, units in enumerate(config.block_units):
            mid_ch, out_ch = config.stage_channels(stage)
            # Stage 1 follows the max-pool and keeps its resolution; later stages halve it.
            strides = [1 if stage == 0 else 2] + [1] * (units - 1)
            blocks = []
            for stride in strides:
                blocks.append(Bottleneck(in_ch, mid_ch, out_ch, stride, config.gn_groups))
                in_ch = out_ch
            self.stages.append(nn.Sequential(*blocks))

    @property
    def feature_channels(self) -> tuple[int, int, int, int]:
        """Channels of the four returned features, highest resolution first."""
        return (*self.config.skip_channels, self.config.out_channels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input [B, {self.in_channels}, H, W], got {tuple(x.shape)}"
            )
        height, width = x.shape[-2:]
        if height % RESNET_STRIDE or width % RESNET_STRIDE:
            raise ValueError(
                f"input height and width must be multiples of {RESNET_STRIDE}, got "
                f"{height}x{width}"
            )
        root = self.root(x)
        features = [root]
        y = self.pool(root)
        for stage in self.stages:
            y = stage(y)
            features.append(y)
        return features
