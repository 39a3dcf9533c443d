"""TransUNet (R50+ViT hybrid) networks: configs, building blocks, npz weights, factory."""

from networks.configs import DecoderConfig, ResNetConfig, TransUNetConfig, ViTConfig
from networks.factory import (
    create_model,
    create_model_from_config,
    list_models,
    model_config,
    register_model,
)
from networks.npz_loader import (
    LoadReport,
    export_google_weights,
    load_google_npz,
    read_npz,
    write_google_npz,
)
from networks.resnet_v2 import ResNetV2, StdConv2d
from networks.transunet import SegmentationHead, TransUNet, TransUNetDecoder, TransUNetEncoder
from networks.vit import VisionTransformer

__all__ = [
    "DecoderConfig",
    "LoadReport",
    "ResNetConfig",
    "ResNetV2",
    "SegmentationHead",
    "StdConv2d",
    "TransUNet",
    "TransUNetConfig",
    "TransUNetDecoder",
    "TransUNetEncoder",
    "ViTConfig",
    "VisionTransformer",
    "create_model",
    "create_model_from_config",
    "export_google_weights",
    "list_models",
    "load_google_npz",
    "model_config",
    "read_npz",
    "register_model",
    "write_google_npz",
]
