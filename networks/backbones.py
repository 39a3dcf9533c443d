"""Named backbones (``--vit_name``): the R50+ViT encoder sizes every network variant is built on.

A registered function maps ``(img_size, in_channels, num_classes)`` to a fresh
``TransUNetConfig``. The architecture built on it (I_MMSeg, early-fusion TransUNet, ...) is the
*variant*, chosen in :mod:`networks.variants`. ``create_transunet`` builds a plain TransUNet and
optionally loads Google npz weights into its encoder; ``transunet_from_config`` rebuilds one from
``model.name`` and ``model.config.to_dict()``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from networks.configs import DecoderConfig, ResNetConfig, TransUNetConfig, ViTConfig
from networks.npz_loader import load_google_npz, read_npz
from networks.transunet import TransUNet

logger = logging.getLogger(__name__)


class ConfigFn(Protocol):
    def __call__(self, *, img_size: int, in_channels: int, num_classes: int) -> TransUNetConfig:
        ...


_REGISTRY: dict[str, ConfigFn] = {}


def register_backbone(name: str) -> Callable[[ConfigFn], ConfigFn]:
    """Decorator registering a config function under ``name`` (names must be unique)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}")

    def decorator(fn: ConfigFn) -> ConfigFn:
        if name in _REGISTRY:
            raise ValueError(f"model name {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return decorator


def list_backbones() -> list[str]:
    """Registered backbone names, sorted."""
    return sorted(_REGISTRY)


def backbone_config(
    name: str, *, img_size: int = 128, in_channels: int = 3, num_classes: int = 4
) -> TransUNetConfig:
    """The config ``create_transunet`` would build for these arguments."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {list_backbones()}")
    return _REGISTRY[name](img_size=img_size, in_channels=in_channels, num_classes=num_classes)


def create_transunet(
    name: str,
    *,
    img_size: int = 128,
    in_channels: int = 3,
    num_classes: int = 4,
    pretrained: str | os.PathLike[str] | None = None,
) -> TransUNet:
    """Build a TransUNet on backbone ``name``; ``pretrained`` is a Google R50+ViT npz loaded
    into its encoder."""
    config = backbone_config(
        name, img_size=img_size, in_channels=in_channels, num_classes=num_classes
    )
    model = TransUNet(config, name=name)
    if pretrained is not None:
        report = load_google_npz(model.encoder, read_npz(pretrained))
        logger.info(
            "loaded %d encoder tensors from %s (unused keys: %s; position grid resized: %s; "
            "input channels adapted: %s)",
            len(report.loaded), pretrained, list(report.unused), report.resized_pos_embed,
            report.adapted_in_channels,
        )
    return model


def transunet_from_config(name: str, config: Mapping[str, Any] | TransUNetConfig) -> TransUNet:
    """Rebuild a model from ``model.name`` and ``model.config.to_dict()`` as a checkpoint stores.

    The config is authoritative, so the name need not be registered any more (it is kept for
    bookkeeping only).
    """
    if not isinstance(config, TransUNetConfig):
        config = TransUNetConfig.from_dict(config)
    return TransUNet(config, name=name)


def _bundle(
    resnet: ResNetConfig,
    vit: ViTConfig,
    decoder: DecoderConfig,
    img_size: int,
    in_channels: int,
    num_classes: int,
) -> TransUNetConfig:
    return TransUNetConfig(
        resnet=resnet, vit=vit, decoder=decoder, img_size=img_size, in_channels=in_channels,
        num_classes=num_classes,
    )


@register_backbone("R50-ViT-B_16")
def r50_vit_b16(*, img_size: int, in_channels: int, num_classes: int) -> TransUNetConfig:
    """TransUNet as published: R50 (3, 4, 9) + ViT-Base, cascaded upsampler with 3 skips."""
    return _bundle(
        ResNetConfig(block_units=(3, 4, 9), width=64),
        ViTConfig(hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072),
        DecoderConfig(), img_size, in_channels, num_classes,
    )


@register_backbone("R50-ViT-L_16")
def r50_vit_l16(*, img_size: int, in_channels: int, num_classes: int) -> TransUNetConfig:
    """R50 (3, 4, 9) + ViT-Large."""
    return _bundle(
        ResNetConfig(block_units=(3, 4, 9), width=64),
        ViTConfig(hidden_size=1024, num_layers=24, num_heads=16, mlp_dim=4096),
        DecoderConfig(), img_size, in_channels, num_classes,
    )


@register_backbone("R26-ViT-S_16")
def r26_vit_s16(*, img_size: int, in_channels: int, num_classes: int) -> TransUNetConfig:
    """Lighter CPU-friendly backbone: R26 (2, 2, 2) + ViT-Small."""
    return _bundle(
        ResNetConfig(block_units=(2, 2, 2), width=64),
        ViTConfig(hidden_size=384, num_layers=12, num_heads=6, mlp_dim=1536),
        DecoderConfig(), img_size, in_channels, num_classes,
    )


@register_backbone("tiny")
def tiny(*, img_size: int, in_channels: int, num_classes: int) -> TransUNetConfig:
    """Minimal backbone for fast CPU tests; every code path of the full model is exercised."""
    return _bundle(
        ResNetConfig(block_units=(1, 1, 1), width=8, gn_groups=4),
        ViTConfig(hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64),
        DecoderConfig(channels=(32, 16, 8, 8), n_skip=3, head_channels=64),
        img_size, in_channels, num_classes,
    )
