"""``immseg_released``: the network of the released I_MMSeg code, module for module.

Written from our reading of the release (zzzzzzl24/I_MMSeg @ 90f46c4, facts in
docs/release_facts.md sections 2-4; no code copied). Module names, parameter names and shapes
are the release's, so the authors' state dict (``epoch_299.pth``: 934 tensors, 84,975,359
parameters for R50 at 128 px, saved from nn.DataParallel with a ``module.`` prefix) loads with
:func:`load_release_state_dict`. Per sequence (the release's cine = bSSFP, psir = LGE, t2w = T2w):

1. ``transformerK``: a ResNetV2 of its own and no ViT layers (``embeddings.hybrid_model``); the
   1-channel slice is repeated to 3 channels. Its deepest block (1024 channels at H/16) is the
   bottleneck; root (H/2), block1 (H/4, zero-padded on the bottom/right from H/4 - 1 as
   released) and block2 (H/8) are the skips.
2. CMFE: the modality text and the pooled bottleneck give a spatial gate (``class_MLP_*``); every
   pixel of the gated map attends to every pixel of each other sequence's gated map by absolute
   cosine similarity and aggregates its *own* gated features (as released); the ungated map and
   the two enhanced maps are fused by ``mix_*``.
3. ``decoderK`` (TransUNet's cascaded upsampler) decodes each enhanced map with the sequence's
   raw skips; ``dec_output_fusion`` fuses the three decoded maps and ``feature_fusion`` the skips.
4. ``forward_prediction_head`` turns the fused decoding into logits with per-class dynamic 1x1
   convolutions generated from the class texts and the pooled skips (late fusion).
5. Training only: per sequence, CFM (``CBAMFeatureReducer_*`` -> ``class_MLP_dec_*`` ->
   ``Class_Feature_Modulation_*``) modulates the class texts, and ``forward_prediction_headK``
   predicts from that sequence's decoding alone; ``*_embed`` project the raw skips at H/2, H/4,
   H/8 for the release's supervised contrast (``text_to_64/128/256`` project the class texts).

Departures, each a fix of the release that keeps its weights loadable:

* priors are keyed by sequence name (the release indexes rows of a file whose order changed
  without being re-encoded); they travel in our checkpoints as buffers, which the release's
  state dict lacks and the loader tolerates;
* CFM is per sample: the release averages the CBAM vector over the batch (over each
  DataParallel replica's share), so a slice's per-sequence prediction depended on its batch;
* the 64 gate outputs, an 8 x 8 grid in the release, are resized to the bottleneck, so any input
  that is a multiple of 16 works (at 128 px the resize is the identity);
* the ResNet's depth and width follow the chosen backbone (``R26-ViT-S_16`` gives a lighter
  network of the same structure); only R50 loads the authors' weights.

Modules the release defines but never calls (``decoder4``, ``fusion_embed``,
``forward_prediction_head4``, ``segmentation_head{,1,2,3}``) are kept so that its state dict
loads strictly; they receive no gradient.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datasets.labels import MODALITIES
from networks.capabilities import Capabilities
from networks.configs import TransUNetConfig
from networks.contrastive import RELEASE_IGNORED
from networks.immseg import ContrastProjection, IMMSegOutput
from networks.resnet_v2 import GN_EPS, StdConv2d
from networks.transunet import TransUNetDecoder
from utils import ConfigRecord, check_int, from_mapping

#: The release's names of the sequences, in MODALITIES order.
RELEASE_NAMES = {"bSSFP": "cine", "LGE": "psir", "T2w": "t2w"}
#: Side of the gate grid the release's class_MLP_* outputs (8 x 8 = 64 values).
GATE_GRID = 8
#: Width of the text and visual vectors the release works with.
EMBED = 256
#: Channels of the decoded map the prediction heads reduce to (4 in the release).
HEAD_CHANNELS = 4
#: Weight standardisation epsilon of the release's StdConv2d.
STD_EPS = 1e-5
PRIOR_KEYS = ("modality_priors", "class_priors")


def _default_backbone() -> TransUNetConfig:
    return TransUNetConfig(in_channels=1)


@dataclass(frozen=True)
class ReleasedConfig(ConfigRecord):
    """What rebuilds an :class:`IMMSegReleased` (the priors travel in its state dict)."""

    backbone: TransUNetConfig = field(default_factory=_default_backbone)
    prior_dim: int = 512

    def __post_init__(self) -> None:
        if not isinstance(self.backbone, TransUNetConfig):
            raise ValueError(f"backbone must be a TransUNetConfig, got {self.backbone!r}")
        check_int("prior_dim", self.prior_dim)
        if self.backbone.decoder.n_skip != 3:
            raise ValueError("the released network uses 3 skips")

    @property
    def num_classes(self) -> int:
        return self.backbone.num_classes

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReleasedConfig:
        kwargs = dict(data)
        if "backbone" in kwargs and not isinstance(kwargs["backbone"], TransUNetConfig):
            kwargs["backbone"] = TransUNetConfig.from_dict(kwargs["backbone"])
        return from_mapping(cls, kwargs)


# --------------------------------------------------------------------------------------------
# Encoder: ResNetV2 under the release's names, no ViT


class ReleaseUnit(nn.Module):
    """Bottleneck unit: conv-GN-ReLU (1x1), conv-GN-ReLU (3x3, carries the stride), conv-GN
    (1x1), plus the shortcut (``downsample`` + ``gn_proj``, one group per channel), ReLU."""

    def __init__(self, cin: int, cmid: int, cout: int, stride: int, groups: int = 32) -> None:
        super().__init__()
        self.gn1 = nn.GroupNorm(groups, cmid, eps=GN_EPS)
        self.conv1 = StdConv2d(cin, cmid, 1, bias=False, eps=STD_EPS)
        self.gn2 = nn.GroupNorm(groups, cmid, eps=GN_EPS)
        self.conv2 = StdConv2d(cmid, cmid, 3, stride=stride, padding=1, bias=False, eps=STD_EPS)
        self.gn3 = nn.GroupNorm(groups, cout, eps=GN_EPS)
        self.conv3 = StdConv2d(cmid, cout, 1, bias=False, eps=STD_EPS)
        self.downsample: StdConv2d | None = None
        self.gn_proj: nn.GroupNorm | None = None
        if stride != 1 or cin != cout:
            self.downsample = StdConv2d(cin, cout, 1, stride=stride, bias=False, eps=STD_EPS)
            self.gn_proj = nn.GroupNorm(cout, cout)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        if self.downsample is not None and self.gn_proj is not None:
            shortcut = self.gn_proj(self.downsample(x))
        y = F.relu(self.gn1(self.conv1(x)))
        y = F.relu(self.gn2(self.conv2(y)))
        return F.relu(self.gn3(self.conv3(y)) + shortcut)


class ReleaseResNet(nn.Module):
    """``root`` (7x7/2 StdConv, GN, ReLU), a 3x3/2 max-pool without padding, ``body`` of three
    blocks. Returns the bottleneck and the skips highest resolution first (H/2, H/4, H/8)."""

    def __init__(self, block_units: Sequence[int], width: int, groups: int = 32) -> None:
        super().__init__()
        self.root = nn.Sequential(OrderedDict(
            conv=StdConv2d(3, width, 7, stride=2, padding=3, bias=False, eps=STD_EPS),
            gn=nn.GroupNorm(groups, width, eps=GN_EPS), relu=nn.ReLU(inplace=True)))
        blocks, cin = OrderedDict(), width
        for b, units in enumerate(block_units):
            cmid, cout = width * 2 ** b, width * 4 * 2 ** b
            blocks[f"block{b + 1}"] = nn.Sequential(OrderedDict(
                (f"unit{u + 1}", ReleaseUnit(cin if u == 0 else cout, cmid, cout,
                                             2 if (b > 0 and u == 0) else 1, groups))
                for u in range(units)))
            cin = cout
        self.body = nn.Sequential(blocks)
        self.skip_channels = (width, width * 4, width * 8)
        self.out_channels = cin

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        size = x.shape[-1]
        root = self.root(x)
        skips = [root]
        x = F.max_pool2d(root, kernel_size=3, stride=2, padding=0)
        blocks = list(self.body)
        for index, block in enumerate(blocks[:-1]):
            x = block(x)
            expected = size // 4 // (index + 1)
            # The release pads a short map with zeros on the bottom/right (H/4 - 1 -> H/4).
            skip = x if x.shape[-1] == expected else F.pad(
                x, (0, expected - x.shape[-1], 0, expected - x.shape[-2]))
            skips.append(skip)
        return blocks[-1](x), skips


class _Embeddings(nn.Module):
    def __init__(self, block_units: Sequence[int], width: int, groups: int) -> None:
        super().__init__()
        self.hybrid_model = ReleaseResNet(block_units, width, groups)
        self.dropout = nn.Dropout(0.1)


class ReleaseEncoder(nn.Module):
    """``transformerK``: only ``embeddings.hybrid_model`` (and a dropout) remain of the ViT."""

    def __init__(self, block_units: Sequence[int], width: int, groups: int = 32) -> None:
        super().__init__()
        self.embeddings = _Embeddings(block_units, width, groups)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        features, skips = self.embeddings.hybrid_model(x.repeat(1, 3, 1, 1))
        return self.embeddings.dropout(features), skips


# --------------------------------------------------------------------------------------------
# Small blocks


class FusionEmbed(nn.Module):
    """1x1 conv (no bias) -> BatchNorm -> ReLU over concatenated maps."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.fusion_proj = nn.Conv2d(cin, cout, 1, bias=False)
        self.norm = nn.BatchNorm2d(cout)

    def forward(self, *maps: Tensor) -> Tensor:
        return F.relu(self.norm(self.fusion_proj(torch.cat(maps, dim=1))))


class SkipFusionRelease(nn.Module):
    """``feature_fusion``: per skip level, the three sequences' skips fused (deepest first)."""

    def __init__(self, skip_channels: Sequence[int], sequences: int) -> None:
        super().__init__()
        for level, channels in enumerate(reversed(tuple(skip_channels))):
            self.add_module(f"fusion{level + 1}", FusionEmbed(sequences * channels, channels))

    def forward(self, skips: Sequence[Sequence[Tensor]]) -> list[Tensor]:
        """``skips[s]`` highest resolution first -> fused skips, highest resolution first."""
        levels = len(skips[0])
        return [getattr(self, f"fusion{levels - level}")(*(s[level] for s in skips))
                for level in range(levels)]


class ReleaseMlp(nn.Module):
    """fc1 -> GELU -> fc2 -> GELU -> sigmoid -> dropout (outputs in about (0.46, 1), as
    released); xavier-uniform weights, biases drawn with std 1e-6."""

    def __init__(self, cin: int, hidden: int, cout: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(cin, hidden), nn.Linear(hidden, cout)
        self.dropout = nn.Dropout(0.1)
        for layer in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.normal_(layer.bias, std=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        x = F.gelu(self.fc2(F.gelu(self.fc1(x))))
        return self.dropout(torch.sigmoid(x))


def _linear_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cin, cout), nn.ReLU(inplace=True))


class ChannelAttention(nn.Module):
    def __init__(self, channels: int, ratio: int = 16) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(channels, channels // ratio, bias=False),
                                 nn.ReLU(inplace=True),
                                 nn.Linear(channels // ratio, channels, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        weights = self.mlp(x.mean(dim=(2, 3))) + self.mlp(x.amax(dim=(2, 3)))
        return x * torch.sigmoid(weights)[:, :, None, None]


class SpatialAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 7, padding=3, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(pooled))


class _CBAM(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channel_att = ChannelAttention(channels)
        self.spatial_att = SpatialAttention()

    def forward(self, x: Tensor) -> Tensor:
        return self.spatial_att(self.channel_att(x))


class CBAMFeatureReducer(nn.Module):
    """CBAM, 1x1 conv to ``cout``, global average: ``[B, C, h, w]`` -> ``[B, cout]``."""

    def __init__(self, channels: int, cout: int = 64) -> None:
        super().__init__()
        self.cbam = _CBAM(channels)
        self.conv1x1 = nn.Conv2d(channels, cout, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv1x1(self.cbam(x)).mean(dim=(2, 3))


class ClassModulation(nn.Module):
    """``Class_Feature_Modulation_*``: per class a scale and a shift, ``c * (1 + gamma) + beta``
    (output ``2k`` is class k's gamma, ``2k + 1`` its beta)."""

    def __init__(self, cin: int, classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(cin, 2 * classes)

    def forward(self, vector: Tensor, classes: Tensor) -> Tensor:
        """``vector [B, cin]``, ``classes [K, E]`` -> per sample ``[B, K, E]``."""
        film = self.fc(vector).unflatten(1, (classes.shape[0], 2))
        return classes[None] * (1 + film[..., :1]) + film[..., 1:]


class ContrastEmbed(nn.Module):
    """``*_embed``: the release's projections of the raw skips for its contrast."""

    def __init__(self, skip_channels: Sequence[int]) -> None:
        super().__init__()
        c64, c256, c512 = skip_channels
        self.features64_to_64 = ContrastProjection(c64, c64)
        self.features256_to_128 = ContrastProjection(c256, c256 // 2)
        self.features512_to_256 = ContrastProjection(c512, c512 // 2)

    def projections(self) -> tuple[ContrastProjection, ...]:
        return (self.features64_to_64, self.features256_to_128, self.features512_to_256)

    def forward(self, skips: Sequence[Tensor]) -> tuple[Tensor, ...]:
        return tuple(project(s) for project, s in zip(self.projections(), skips, strict=True))


def _pooled(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.GroupNorm(4, channels), nn.ReLU(inplace=True),
                         nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, EMBED, 1))


class PredictionHead(nn.Module):
    """``forward_prediction_head*``: per class, a 2-layer pixel MLP (4 -> 4 -> 1) whose weights
    the ``controller`` generates from ``[pooled skips, class text]``; its input is the decoded
    map reduced to 4 channels (``precls_conv``). Split of the 25 generated values: layer-1
    weights (16), layer-2 weights (4), layer-1 biases (4), layer-2 bias (1)."""

    def __init__(self, skip_channels: Sequence[int], decoded: int) -> None:
        super().__init__()
        c64, c256, c512 = skip_channels
        hc = HEAD_CHANNELS
        self.controller = nn.Conv2d(2 * EMBED, hc * hc + hc + hc + 1, 1)
        self.Gap_64 = _pooled(c64)  # the release's names, capitals included
        self.GAP_256 = _pooled(c256)
        self.GAP_512 = _pooled(c512)
        self.precls_conv = nn.Sequential(nn.GroupNorm(4, decoded), nn.ReLU(inplace=True),
                                         nn.Conv2d(decoded, hc, 1))

    def forward(self, decoded: Tensor, skips: Sequence[Tensor], classes: Tensor) -> Tensor:
        """``decoded [B, C, H, W]``, skips highest resolution first, ``classes [K, E]`` or
        ``[B, K, E]`` -> logits ``[B, K, H, W]``."""
        batch = decoded.shape[0]
        visual = torch.stack([self.Gap_64(skips[0]), self.GAP_256(skips[1]),
                              self.GAP_512(skips[2])]).mean(dim=0).flatten(1)  # [B, E]
        if classes.ndim == 2:
            classes = classes.expand(batch, *classes.shape)
        k, hc = classes.shape[1], HEAD_CHANNELS
        joint = torch.cat([visual[:, None].expand(-1, k, -1), classes], dim=2)  # [B, K, 2E]
        params = self.controller(joint.flatten(0, 1)[..., None, None]).view(batch, k, -1)
        w1, w2, b1, b2 = torch.split(params, (hc * hc, hc, hc, 1), dim=2)
        x = self.precls_conv(decoded)  # [B, hc, H, W]
        hidden = torch.einsum("bkoi,bihw->bkohw", w1.view(batch, k, hc, hc), x)
        hidden = F.relu(hidden + b1[..., None, None])
        return torch.einsum("bko,bkohw->bkhw", w2, hidden) + b2[..., None]


# --------------------------------------------------------------------------------------------
# The network


def _pixel_exchange(query: Tensor, partner: Tensor) -> Tensor:
    """Every pixel of ``query`` attends to every pixel of ``partner`` (softmax of |cos|, no
    temperature) and aggregates ``query``'s own features, as released."""
    q = F.normalize(query.flatten(2), dim=1, eps=1e-8)
    k = F.normalize(partner.flatten(2), dim=1, eps=1e-8)
    weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k).abs(), dim=-1)
    return torch.einsum("bij,bcj->bci", weights, query.flatten(2)).view_as(query)


class IMMSegReleased(nn.Module):
    """The released I_MMSeg network (module docstring); ``forward`` gives the fused logits,
    ``forward_train`` adds the per-sequence logits and the contrast projections."""

    variant = "immseg_released"
    capabilities = Capabilities(training_outputs=True)
    sequences = MODALITIES

    def __init__(self, config: ReleasedConfig, modality_priors: Tensor, class_priors: Tensor,
                 name: str = "R50-ViT-B_16") -> None:
        super().__init__()
        if not isinstance(config, ReleasedConfig):
            raise ValueError(f"config must be a ReleasedConfig, got {type(config).__name__}")
        self.config, self.name = config, name
        k, dim = config.num_classes, config.prior_dim
        for key, value, rows in (("modality_priors", modality_priors, len(MODALITIES)),
                                 ("class_priors", class_priors, k)):
            if not isinstance(value, Tensor) or tuple(value.shape) != (rows, dim):
                raise ValueError(f"{key} must be a tensor [{rows}, {dim}] (rows by name), got "
                                 f"{getattr(value, 'shape', type(value).__name__)}")
            self.register_buffer(key, value.detach().float().clone())
        backbone = config.backbone
        resnet = backbone.resnet
        for index in (1, 2, 3):
            self.add_module(f"transformer{index}", ReleaseEncoder(
                resnet.block_units, resnet.width, resnet.gn_groups))
        encoder = self.transformer1.embeddings.hybrid_model
        hidden, skips = encoder.out_channels, encoder.skip_channels
        for index in (1, 2, 3, 4):
            self.add_module(f"decoder{index}", TransUNetDecoder(hidden, skips, backbone.decoder))
        decoded = backbone.decoder.channels[-1]
        self.feature_fusion = SkipFusionRelease(skips, len(MODALITIES))
        widths = (skips[0], skips[1] // 2, skips[2] // 2)
        for w in widths:
            self.add_module(f"text_to_{w}", _linear_relu(dim, w))
        self.text_to_vision = _linear_relu(dim, EMBED)
        for seq in self._names():
            self.add_module(f"GAP_{seq}", nn.Sequential(
                nn.AdaptiveAvgPool2d(1), nn.Conv2d(hidden, EMBED, 1), nn.Flatten()))
        self.modal_text_to_vision = _linear_relu(dim, EMBED)
        self.modal_text_to_weight = nn.Sequential(ReleaseMlp(dim, 128, 64), nn.ReLU())
        for seq in self._names():
            self.add_module(f"mix_{seq}", FusionEmbed(3 * hidden, hidden))
            self.add_module(f"CBAMFeatureReducer_{seq}", CBAMFeatureReducer(hidden))
            self.add_module(f"Class_Feature_Modulation_{seq}", ClassModulation(32, k))
            self.add_module(f"class_MLP_dec_{seq}", ReleaseMlp(128, 64, 32))
        for prefix in ("fusion", *self._names()):
            self.add_module(f"{prefix}_embed", ContrastEmbed(skips))
        for seq in self._names():
            self.add_module(f"class_MLP_{seq}", ReleaseMlp(2 * EMBED, EMBED, GATE_GRID ** 2))
        for suffix in ("", "1", "2", "3", "4"):
            self.add_module(f"forward_prediction_head{suffix}", PredictionHead(skips, decoded))
        self.dec_output_fusion = FusionEmbed(3 * decoded, decoded)
        for suffix in ("", "1", "2", "3"):
            self.add_module(f"segmentation_head{suffix}", nn.Sequential(
                nn.Conv2d(decoded, k, 3, padding=1)))
        self._widths = widths

    @staticmethod
    def _names() -> list[str]:
        return [RELEASE_NAMES[seq] for seq in MODALITIES]

    def _check_input(self, x: Tensor) -> None:
        size = self.config.backbone.img_size
        if not isinstance(x, Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != (3, size, size):
            raise ValueError(f"expected input [B, 3, {size}, {size}] with channels "
                             f"{list(MODALITIES)}, got {tuple(getattr(x, 'shape', ()))}")

    def _encode(self, x: Tensor
                ) -> tuple[list[Tensor], list[Tensor], list[list[Tensor]], list[Tensor]]:
        """Per sequence: the enhanced bottleneck, the decoded map, the raw skips, the raw
        bottleneck."""
        modal = self.modal_text_to_vision(self.modality_priors)  # [S, E]
        names = self._names()
        raw, gated, skips = [], [], []
        for s, seq in enumerate(names):
            feature, own = getattr(self, f"transformer{s + 1}")(x[:, s:s + 1])
            vector = torch.cat([modal[s].expand(x.shape[0], -1),
                                getattr(self, f"GAP_{seq}")(feature)], dim=1)
            gate = getattr(self, f"class_MLP_{seq}")(vector).view(-1, 1, GATE_GRID, GATE_GRID)
            if gate.shape[-2:] != feature.shape[-2:]:
                gate = F.interpolate(gate, size=feature.shape[-2:], mode="bilinear",
                                     align_corners=False)
            raw.append(feature)
            gated.append(feature * gate)
            skips.append(own)
        enhanced, decoded = [], []
        for s, seq in enumerate(names):
            exchanged = [_pixel_exchange(gated[s], gated[p]) for p in range(len(names)) if p != s]
            enhanced.append(getattr(self, f"mix_{seq}")(raw[s], *exchanged))
            decoded.append(getattr(self, f"decoder{s + 1}")(enhanced[s], skips[s]))
        return enhanced, decoded, skips, raw

    def _fused(self, decoded: list[Tensor], skips: list[list[Tensor]],
               classes: Tensor) -> Tensor:
        return self.forward_prediction_head(self.dec_output_fusion(*decoded),
                                            self.feature_fusion(skips), classes)

    def forward(self, x: Tensor) -> Tensor:
        """Fused logits ``[B, K, H, W]`` for ``x [B, 3, H, W]`` (bSSFP, LGE, T2w)."""
        self._check_input(x)
        _, decoded, skips, _ = self._encode(x)
        return self._fused(decoded, skips, self.text_to_vision(self.class_priors))

    def forward_train(self, x: Tensor, sequence_mask: Tensor | None = None) -> IMMSegOutput:
        """Fused logits plus, per sequence, its own prediction (through its class-modulated
        texts) and its raw skips projected for the contrast, with the class texts at each
        width and the classes each sequence's contrast leaves out."""
        if sequence_mask is not None:
            raise ValueError("immseg_released has no missing-sequence handling (as released)")
        self._check_input(x)
        enhanced, decoded, skips, raw = self._encode(x)
        classes = self.text_to_vision(self.class_priors)  # [K, E]
        logits = self._fused(decoded, skips, classes)
        weights = self.modal_text_to_weight(self.modality_priors)  # [S, 64]
        per_sequence, projections = [], []
        for s, seq in enumerate(self._names()):
            reduced = getattr(self, f"CBAMFeatureReducer_{seq}")(enhanced[s])  # [B, 64]
            vector = torch.cat([weights[s].expand(reduced.shape[0], -1), reduced], dim=1)
            modulation = getattr(self, f"class_MLP_dec_{seq}")(vector)
            modulated = getattr(self, f"Class_Feature_Modulation_{seq}")(modulation, classes)
            head = getattr(self, f"forward_prediction_head{s + 1}")
            per_sequence.append(head(decoded[s], skips[s], modulated))
            projections.append(getattr(self, f"{seq}_embed")(skips[s]))
        texts = tuple(getattr(self, f"text_to_{w}")(self.class_priors) for w in self._widths)
        return IMMSegOutput(
            logits, tuple(per_sequence), (), classes.expand(x.shape[0], -1, -1),
            tuple(projections), texts, tuple(RELEASE_IGNORED.get(seq, ()) for seq in MODALITIES),
            tuple(raw))

    def extra_repr(self) -> str:
        params = sum(p.numel() for p in self.parameters())
        return f"name={self.name!r}, parameters={params / 1e6:.2f}M"


# --------------------------------------------------------------------------------------------
# The authors' weights


class ReleaseWeightsError(ValueError):
    """A state dict that is not the released network's (message names the file)."""


def release_state_dict(state: Mapping[str, Tensor], source: str = "state dict"
                       ) -> dict[str, Tensor]:
    """The release's tensors with nn.DataParallel's ``module.`` prefix removed (when every key
    has it; the release's test.py strips 7 characters unconditionally)."""
    if not isinstance(state, Mapping) or not state:
        raise ReleaseWeightsError(f"{source}: not a state dict (a mapping of tensors)")
    keys = list(state)
    if all(key.startswith("module.") for key in keys):
        return {key[len("module."):]: value for key, value in state.items()}
    return dict(state)


def load_release_state_dict(model: IMMSegReleased, state: Mapping[str, Tensor],
                            source: str = "state dict") -> None:
    """Load the authors' weights: every tensor must match by name and shape; only our prior
    buffers (which the release keeps outside its state dict) may be absent."""
    state = release_state_dict(state, source)
    own = model.state_dict()
    missing = sorted(set(own) - set(state) - set(PRIOR_KEYS))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(key for key in set(own) & set(state)
                        if tuple(own[key].shape) != tuple(state[key].shape))
    if missing or unexpected or mismatched:
        def some(keys: list[str]) -> str:
            return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
        problems = [f"{label}: {some(keys)}" for label, keys in (
            ("missing", missing), ("unexpected", unexpected), ("shape differs", mismatched))
            if keys]
        raise ReleaseWeightsError(f"{source}: not a state dict of the released I_MMSeg network "
                                  f"on {model.name} at {model.config.backbone.img_size} px ("
                                  + "; ".join(problems) + ")")
    merged = {**state, **{key: own[key] for key in PRIOR_KEYS if key not in state}}
    model.load_state_dict(merged)
