"""Frozen, validated configurations of the TransUNet (R50 hybrid ViT) family.

Every model is rebuilt from a :class:`TransUNetConfig` alone, so the config is what a checkpoint
stores (``to_dict`` gives plain JSON types, ``from_dict`` reverses it and rejects unknown keys).
Invalid values raise ``ValueError`` on creation rather than as shape errors deep in a forward pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from utils import ConfigRecord, check_int, from_mapping

#: The hybrid encoder downsamples by 2 (root conv), 2 (max-pool), 2 and 2 (stages 2 and 3).
RESNET_STRIDE = 16
#: Decoder blocks double the resolution four times to climb back from H/16 to H.
NUM_DECODER_BLOCKS = 4
#: Skip features offered by the encoder: root (H/2), stage 1 (H/4), stage 2 (H/8).
NUM_SKIPS = 3


def _check_rate(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must lie in [0, 1), got {value}")


def _int_tuple(name: str, value: Any, length: int) -> tuple[int, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a sequence of {length} ints, got {value!r}")
    items = tuple(value)
    if len(items) != length:
        raise ValueError(f"{name} must have {length} entries, got {len(items)}: {items}")
    for i, item in enumerate(items):
        check_int(f"{name}[{i}]", item)
    return items


@dataclass(frozen=True)
class ResNetConfig:
    """ResNetV2-style hybrid stem: weight-standardised convs with GroupNorm, three stages.

    ``width`` is the root channel count; stage ``i`` (0-based) has bottleneck width
    ``width * 2**i`` and output ``4 * width * 2**i`` channels. Every one of those is a multiple of
    ``width``, so ``gn_groups`` dividing ``width`` is the whole GroupNorm condition.
    """

    block_units: tuple[int, int, int] = (3, 4, 9)
    width: int = 64
    gn_groups: int = 32

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_units", _int_tuple("block_units", self.block_units, 3))
        check_int("width", self.width)
        check_int("gn_groups", self.gn_groups)
        if self.width % self.gn_groups:
            raise ValueError(
                f"gn_groups={self.gn_groups} must divide width={self.width} "
                "(all ResNet channel counts are multiples of width)"
            )

    def stage_channels(self, stage: int) -> tuple[int, int]:
        """(bottleneck, output) channels of stage ``stage`` in 0..2."""
        if stage not in range(3):
            raise ValueError(f"stage must be 0, 1 or 2, got {stage}")
        mid = self.width * 2**stage
        return mid, 4 * mid

    @property
    def out_channels(self) -> int:
        """Channels of the last stage, i.e. what the patch embedding sees."""
        return self.stage_channels(2)[1]

    @property
    def skip_channels(self) -> tuple[int, int, int]:
        """Channels of (root, stage 1, stage 2): the skips, highest resolution first."""
        return self.width, self.stage_channels(0)[1], self.stage_channels(1)[1]


@dataclass(frozen=True)
class ViTConfig:
    """Pre-norm transformer encoder; ``patch_size`` is the total stride in input pixels."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.0
    patch_size: int = 16

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "mlp_dim", "patch_size"):
            check_int(name, getattr(self, name))
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must divide hidden_size={self.hidden_size}"
            )
        _check_rate("dropout_rate", self.dropout_rate)
        _check_rate("attention_dropout_rate", self.attention_dropout_rate)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class DecoderConfig:
    """Cascaded upsampler: ``head_channels`` after the first 3x3 conv, then four x2 blocks.

    The first ``n_skip`` blocks (deepest first) concatenate the encoder skip of their resolution.
    """

    channels: tuple[int, int, int, int] = (256, 128, 64, 16)
    n_skip: int = 3
    head_channels: int = 512

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "channels", _int_tuple("channels", self.channels, NUM_DECODER_BLOCKS)
        )
        check_int("n_skip", self.n_skip, minimum=0)
        if self.n_skip > NUM_SKIPS:
            raise ValueError(f"n_skip must be in 0..{NUM_SKIPS}, got {self.n_skip}")
        check_int("head_channels", self.head_channels)


@dataclass(frozen=True)
class TransUNetConfig(ConfigRecord):
    """Everything needed to rebuild a TransUNet: encoder parts, decoder, input and output."""

    resnet: ResNetConfig = field(default_factory=ResNetConfig)
    vit: ViTConfig = field(default_factory=ViTConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    img_size: int = 224
    in_channels: int = 3
    num_classes: int = 4

    def __post_init__(self) -> None:
        for name, cls in (("resnet", ResNetConfig), ("vit", ViTConfig), ("decoder", DecoderConfig)):
            if not isinstance(getattr(self, name), cls):
                raise ValueError(f"{name} must be a {cls.__name__}, got {getattr(self, name)!r}")
        check_int("img_size", self.img_size)
        if self.img_size % RESNET_STRIDE:
            raise ValueError(
                f"img_size must be a multiple of {RESNET_STRIDE}, got {self.img_size}"
            )
        if self.vit.patch_size != RESNET_STRIDE:
            raise ValueError(
                f"vit.patch_size must equal the ResNet stride {RESNET_STRIDE} in the hybrid "
                f"model, got {self.vit.patch_size}"
            )
        check_int("in_channels", self.in_channels)
        check_int("num_classes", self.num_classes)

    @property
    def grid_size(self) -> int:
        """Side of the square token grid."""
        return self.img_size // RESNET_STRIDE

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TransUNetConfig:
        """Inverse of :meth:`to_dict`; accepts lists for tuples as JSON returns them."""
        if not isinstance(data, Mapping):
            raise ValueError(f"TransUNetConfig expects a mapping, got {type(data).__name__}")
        parts = {"resnet": ResNetConfig, "vit": ViTConfig, "decoder": DecoderConfig}
        kwargs = dict(data)
        for name, part in parts.items():
            if name in kwargs:
                kwargs[name] = from_mapping(part, kwargs[name])
        return from_mapping(cls, kwargs)
