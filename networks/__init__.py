"""TransUNet (R50+ViT hybrid) networks: configs, building blocks, npz weights, named backbones."""

from networks.backbones import (
    backbone_config,
    create_transunet,
    list_backbones,
    register_backbone,
    transunet_from_config,
)
from networks.configs import DecoderConfig, ResNetConfig, TransUNetConfig, ViTConfig
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
    "backbone_config",
    "create_transunet",
    "export_google_weights",
    "list_backbones",
    "load_google_npz",
    "read_npz",
    "register_backbone",
    "transunet_from_config",
    "write_google_npz",
]
