"""I_MMSeg: one encoder per MR sequence, text-prior-guided fusion, text-driven dynamic heads.

Data flow for ``x`` [B, S, H, W] (channel order = ``config.sequences``):

1. each sequence goes through its own single-channel TransUNet encoder (or one shared encoder)
   -> bottleneck [B, hidden, H/16, W/16] and skips at H/2, H/4, H/8;
2. CMFE gates each bottleneck with its modality prior, lets the sequences attend to each other
   per pixel and fuses them; the skips of each resolution are fused by a 1x1 conv;
3. one TransUNet decoder climbs back to H; CFM modulates the class priors with the fused context
   and the modality context, and the dynamic head turns them into the main logits [B, K, H, W];
4. training only: per sequence, a light auxiliary branch at H/4 (its enhanced bottleneck plus its
   own H/4 skip) gives deep-supervision logits through the same CFM, conditioned on that
   sequence alone, and pixel embeddings for the pixel-text contrastive loss.

Priors are rows already ordered by ``config.sequences`` and by class index: the caller stacks
them by name, so a file storing rows in another order cannot silently swap modalities.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from networks.capabilities import Capabilities
from networks.class_modulation import ClassFeatureModulation, DynamicHead
from networks.configs import NUM_SKIPS, TransUNetConfig
from networks.contrastive import RELEASE_IGNORED
from networks.npz_loader import LoadReport, load_google_npz
from networks.prior_attention import (
    CROSS_ATTENTION,
    CrossModalFeatureEnhancement,
    PixelPairAttention,
    check_sequence_mask,
    presence_weights,
)
from networks.transunet import Conv2dNormReLU, TransUNetDecoder, TransUNetEncoder
from utils import ConfigRecord, check_int, from_mapping

#: Index of the H/4 skip in the encoder's highest-resolution-first skip list.
AUX_SKIP = 1
#: The sequence anchored skips read: the one the label is drawn on.
ANCHOR_SEQUENCE = "LGE"
#: Forms of the contrastive term (IMMSegConfig.contrastive).
CONTRASTIVE: tuple[str, ...] = ("pixel_text", "release")


def _default_backbone() -> TransUNetConfig:
    return TransUNetConfig(in_channels=1)


@dataclass(frozen=True)
class IMMSegConfig(ConfigRecord):
    """Everything needed to rebuild an :class:`IMMSeg` (the priors travel in its state_dict).

    ``backbone`` describes ONE single-channel encoder and the decoder; ``use_priors=False`` is the
    ablation that replaces the text embeddings by learned vectors of the same shape.
    """

    backbone: TransUNetConfig = field(default_factory=_default_backbone)
    sequences: tuple[str, ...] = ("bSSFP", "LGE", "T2w")
    share_encoder: bool = False
    use_priors: bool = True
    prior_dim: int = 512
    embed_dim: int = 256
    aux_channels: int = 64
    dynamic_hidden: int = 8
    #: CMFE's exchange between sequences: "sequence" (ours) or "pixel" (the release's N x N
    #: attention; see networks.prior_attention), and what the pixel exchange aggregates
    cross_attention: str = "sequence"
    pixel_values: str = "own"
    #: the contrastive term's form: "pixel_text" (ours: every H/4 pixel against the class texts)
    #: or "release" (the released code's supervised contrast over sampled pixels of each
    #: sequence's raw skips at H/2, H/4, H/8, with per-sequence ignored classes)
    contrastive: str = "pixel_text"
    #: ours, for misaligned inputs (docs/misalignment.md): the finest ``anchor_skips`` skip
    #: resolutions (1: H/2; 2: H/2 and H/4; 3: also H/8) reach the decoder from LGE alone, the
    #: sequence the label is drawn on, so the other sequences shape boundaries only through the
    #: coarser skips and the bottleneck. Without LGE in a sample, its present sequences serve;
    #: their weights there learn only from training samples that lacked LGE (sequence dropout
    #: or a missing file). 0: every sequence at every resolution (the release's and our default).
    anchor_skips: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.backbone, TransUNetConfig):
            raise ValueError(f"backbone must be a TransUNetConfig, got {self.backbone!r}")
        if self.backbone.in_channels != 1:
            raise ValueError("backbone.in_channels must be 1 (one encoder per MR sequence), got "
                             f"{self.backbone.in_channels}")
        if isinstance(self.sequences, str | bytes) or not isinstance(self.sequences, Sequence):
            raise ValueError(f"sequences must be a sequence of names, got {self.sequences!r}")
        sequences = tuple(self.sequences)
        if not sequences:
            raise ValueError("sequences must name at least one MR sequence")
        for seq in sequences:
            # Names become module keys: no dots, nothing shadowing ModuleDict attributes.
            if not isinstance(seq, str) or not seq or "." in seq or hasattr(nn.ModuleDict, seq):
                raise ValueError(f"invalid sequence name {seq!r}")
        if len(set(sequences)) != len(sequences):
            raise ValueError(f"sequence names must be unique, got {sequences}")
        object.__setattr__(self, "sequences", sequences)
        for name in ("share_encoder", "use_priors"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("prior_dim", "embed_dim", "aux_channels", "dynamic_hidden"):
            check_int(name, getattr(self, name))
        if self.cross_attention not in CROSS_ATTENTION:
            raise ValueError(f"cross_attention must be one of {CROSS_ATTENTION}, got "
                             f"{self.cross_attention!r}")
        if self.pixel_values not in PixelPairAttention.VALUES:
            raise ValueError(f"pixel_values must be one of {PixelPairAttention.VALUES}, got "
                             f"{self.pixel_values!r}")
        if (isinstance(self.anchor_skips, bool) or not isinstance(self.anchor_skips, int)
                or not 0 <= self.anchor_skips <= NUM_SKIPS):
            raise ValueError(f"anchor_skips must be an int in 0..{NUM_SKIPS}, got "
                             f"{self.anchor_skips!r}")
        if self.anchor_skips and ANCHOR_SEQUENCE not in sequences:
            raise ValueError(f"anchor_skips needs {ANCHOR_SEQUENCE} among the sequences, got "
                             f"{sequences}")
        if self.contrastive not in CONTRASTIVE:
            raise ValueError(f"contrastive must be one of {CONTRASTIVE}, got "
                             f"{self.contrastive!r}")

    @property
    def num_classes(self) -> int:
        return self.backbone.num_classes

    @property
    def num_sequences(self) -> int:
        return len(self.sequences)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IMMSegConfig:
        """Inverse of :meth:`to_dict`; rejects unknown keys, accepts lists for tuples."""
        if not isinstance(data, Mapping):
            raise ValueError(f"IMMSegConfig expects a mapping, got {type(data).__name__}")
        kwargs = dict(data)
        if "backbone" in kwargs and not isinstance(kwargs["backbone"], TransUNetConfig):
            kwargs["backbone"] = TransUNetConfig.from_dict(kwargs["backbone"])
        return from_mapping(cls, kwargs)


class IMMSegOutput(NamedTuple):
    """Training outputs: main logits [B, K, H, W]; per sequence (config order) aux logits
    [B, K, H/4, W/4] and pixel embeddings [B, E, H/4, W/4]; class embeddings [B, K, E] that the
    main head used, to pair with the pixel embeddings in the contrastive loss."""

    logits: Tensor
    aux_logits: tuple[Tensor, ...]
    pixel_embeddings: tuple[Tensor, ...]
    class_embeddings: Tensor
    #: contrastive="release" only: per sequence, its projected raw skips at H/2, H/4, H/8; per
    #: scale, the class texts projected to that width [K, D_k]; per sequence, the classes its
    #: contrast leaves out
    scale_embeddings: tuple[tuple[Tensor, ...], ...] = ()
    scale_texts: tuple[Tensor, ...] = ()
    ignored_classes: tuple[tuple[int, ...], ...] = ()
    #: per sequence, its encoder's bottleneck [B, C, h, w] (the semi-supervised channel
    #: consistency compares them)
    sequence_features: tuple[Tensor, ...] = ()


class ContrastProjection(nn.Sequential):
    """The release's projection of a raw skip for the contrast: 1x1 conv, instance norm (no
    affine), ReLU, 1x1 conv."""

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__(nn.Conv2d(in_channels, width, 1), nn.InstanceNorm2d(width),
                         nn.ReLU(inplace=True), nn.Conv2d(width, width, 1))


def anchor_mask(mask: Tensor | None, sequences: Sequence[str], batch: int,
                device: torch.device) -> Tensor:
    """``[B, S]`` bool: the anchor sequence alone where a sample has it, else the sample's
    present sequences (``mask``, None meaning all present)."""
    index = list(sequences).index(ANCHOR_SEQUENCE)
    anchor = torch.zeros(batch, len(sequences), dtype=torch.bool, device=device)
    anchor[:, index] = True
    if mask is None:
        return anchor
    return torch.where(mask[:, index, None], anchor, mask)


class SkipFusion(nn.Module):
    """Per resolution, concat the S sequences' skips -> 1x1 conv -> BN -> ReLU (one skip width).

    Only the ``n_skip`` deepest skips are fused (the others are never read by the decoder, and a
    fusion layer without gradient would be dead weight); unused slots pass sequence 0's skip.
    The ``anchored`` resolutions (indices, 0 = H/2) take their own weights, which
    :func:`anchor_mask` sets to the anchor sequence alone.
    """

    def __init__(self, skip_channels: Sequence[int], num_sequences: int, n_skip: int,
                 anchored: Sequence[int] = ()) -> None:
        super().__init__()
        self.num_sequences = num_sequences
        self.used = tuple(range(NUM_SKIPS - n_skip, NUM_SKIPS))
        self.anchored = tuple(i for i in anchored if i in self.used)
        self.fuse = nn.ModuleDict({
            str(i): nn.Sequential(
                nn.Conv2d(num_sequences * skip_channels[i], skip_channels[i], 1, bias=False),
                nn.BatchNorm2d(skip_channels[i]),
                nn.ReLU(inplace=True),
            )
            for i in self.used
        })

    def forward(self, skips: Sequence[Sequence[Tensor]], weights: Tensor | None,
                anchored_weights: Tensor | None = None) -> list[Tensor]:
        """``skips[s][i]``: skip i of sequence s; ``weights`` [B, S] from presence_weights, and
        ``anchored_weights`` [B, S] for the anchored resolutions."""
        fused = list(skips[0])
        for i in self.used:
            stacked = torch.stack([s[i] for s in skips], dim=1)
            scale = anchored_weights if i in self.anchored else weights
            if scale is not None:
                stacked = stacked * scale[:, :, None, None, None]
            fused[i] = self.fuse[str(i)](stacked.flatten(1, 2))
        return fused


class AuxBranch(nn.Module):
    """Cheap per-sequence deep supervision at H/4 plus contrastive pixel embeddings.

    3x3 conv on the enhanced bottleneck, bilinear upsampling to the H/4 skip, concat, 3x3 conv;
    a dynamic head gives logits and a 1x1 conv gives embeddings. H/4 rather than H/16 because the
    myocardium is one or two cells thick at H/16: a contrastive loss there sees only mixed cells.
    """

    def __init__(self, hidden: int, skip_channels: int, channels: int, embed_dim: int,
                 dynamic_hidden: int) -> None:
        super().__init__()
        self.reduce = Conv2dNormReLU(hidden, channels)
        self.merge = Conv2dNormReLU(channels + skip_channels, channels)
        self.head = DynamicHead(channels, embed_dim, dynamic_hidden)
        self.embed = nn.Conv2d(channels, embed_dim, kernel_size=1)

    def forward(self, features: Tensor, skip: Tensor, classes: Tensor,
                context: Tensor) -> tuple[Tensor, Tensor]:
        x = F.interpolate(self.reduce(features), size=skip.shape[-2:], mode="bilinear",
                          align_corners=False)
        x = self.merge(torch.cat([x, skip], dim=1))
        return self.head(x, classes, context), self.embed(x)


def _check_prior(name: str, value: Any, shape: tuple[int, int]) -> Tensor:
    if not isinstance(value, Tensor) or not value.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor {list(shape)}, got "
                         f"{getattr(value, 'dtype', type(value).__name__)}")
    if tuple(value.shape) != shape:
        raise ValueError(f"{name} must be {list(shape)} (rows in config order), got "
                         f"{list(value.shape)}")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} holds non-finite values")
    return value.detach().to(torch.float32).clone()


def _shared_or_new(
    keys: Sequence[str], shared: bool, make: Callable[[], nn.Module]
) -> nn.ModuleDict:
    """ModuleDict over ``keys`` holding one module ``make()`` for all keys or one per key.

    A module held several times is counted once by ``parameters()``, so optimisers and
    parameter counts see it once.
    """
    first = make()
    return nn.ModuleDict({k: first if shared or i == 0 else make() for i, k in enumerate(keys)})


class IMMSeg(nn.Module):
    """Multi-encoder segmentation network guided by modality and class text priors.

    ``modality_priors`` [S, prior_dim] and ``class_priors`` [K, prior_dim] are required with
    ``use_priors=True`` and become frozen buffers (saved in the state_dict); with
    ``use_priors=False`` they must be None and learned parameters of the same shape replace them.
    ``forward`` returns the main logits only; ``forward_train`` returns :class:`IMMSegOutput`.
    """

    capabilities = Capabilities(sequence_mask=True, training_outputs=True)

    def __init__(
        self,
        config: IMMSegConfig,
        modality_priors: Tensor | None = None,
        class_priors: Tensor | None = None,
        name: str = "immseg",
    ) -> None:
        super().__init__()
        if not isinstance(config, IMMSegConfig):
            raise ValueError(f"config must be an IMMSegConfig, got {type(config).__name__}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        self.config = config
        self.name = name
        self._init_priors(modality_priors, class_priors)
        backbone, seqs, shared = config.backbone, config.sequences, config.share_encoder
        self.encoders = _shared_or_new(
            seqs, shared, lambda: TransUNetEncoder.from_config(backbone, in_channels=1)
        )
        first = self.encoders[seqs[0]]
        hidden, skip_channels = first.out_channels, first.skip_channels
        self.cmfe = CrossModalFeatureEnhancement(
            hidden, len(seqs), config.prior_dim, config.embed_dim, backbone.vit.num_heads,
            shared=shared, cross_attention=config.cross_attention,
            pixel_values=config.pixel_values,
        )
        self.skip_fusion = SkipFusion(skip_channels, len(seqs), backbone.decoder.n_skip,
                                      anchored=range(config.anchor_skips))
        self.decoder = TransUNetDecoder(hidden, skip_channels, backbone.decoder)
        self.cfm = ClassFeatureModulation(config.prior_dim, hidden, config.embed_dim)
        self.head = DynamicHead(self.decoder.out_channels, config.embed_dim,
                                config.dynamic_hidden)
        self.aux = _shared_or_new(seqs, shared, lambda: AuxBranch(
            hidden, skip_channels[AUX_SKIP], config.aux_channels, config.embed_dim,
            config.dynamic_hidden,
        ))
        if config.contrastive == "release":
            # The release's widths: 64 -> 64, 256 -> 128, 512 -> 256 on R50's skips.
            widths = (skip_channels[0], skip_channels[1] // 2, skip_channels[2] // 2)
            self.contrast_heads = _shared_or_new(seqs, shared, lambda: nn.ModuleList(
                ContrastProjection(c, w) for c, w in zip(skip_channels, widths, strict=True)))
            self.contrast_texts = nn.ModuleList(
                nn.Sequential(nn.Linear(config.prior_dim, w), nn.ReLU()) for w in widths)

    def _init_priors(self, modality_priors: Tensor | None, class_priors: Tensor | None) -> None:
        config = self.config
        shapes = {
            "modality_priors": (config.num_sequences, config.prior_dim),
            "class_priors": (config.num_classes, config.prior_dim),
        }
        given = {"modality_priors": modality_priors, "class_priors": class_priors}
        if config.use_priors:
            for key, shape in shapes.items():
                if given[key] is None:
                    raise ValueError(f"{key} {list(shape)} is required with use_priors=True")
                self.register_buffer(key, _check_prior(key, given[key], shape))
            return
        passed = [key for key, value in given.items() if value is not None]
        if passed:
            raise ValueError(f"use_priors=False learns its own vectors; do not pass {passed}")
        for key, shape in shapes.items():
            # Same distribution as unit-norm sentence embeddings: the ablation differs in content.
            self.register_parameter(key, nn.Parameter(F.normalize(torch.randn(shape), dim=1)))

    @property
    def variant(self) -> str:
        """``immseg``, or ``immseg_noprior`` for the learned-vector ablation."""
        return "immseg" if self.config.use_priors else "immseg_noprior"

    @classmethod
    def from_state_dict(
        cls,
        config: IMMSegConfig | Mapping[str, Any],
        state_dict: Mapping[str, Tensor],
        name: str = "immseg",
    ) -> IMMSeg:
        """Rebuild from a checkpoint alone: the frozen priors are read from ``state_dict``."""
        if not isinstance(config, IMMSegConfig):
            config = IMMSegConfig.from_dict(config)
        priors: dict[str, Tensor] = {}
        if config.use_priors:
            missing = [k for k in ("modality_priors", "class_priors") if k not in state_dict]
            if missing:
                raise ValueError(f"state_dict lacks the prior buffers {missing}")
            priors = {k: state_dict[k] for k in ("modality_priors", "class_priors")}
        model = cls(config, name=name, **priors)
        model.load_state_dict(state_dict)
        return model

    def unique_encoders(self) -> list[TransUNetEncoder]:
        """The distinct encoder modules (one when ``share_encoder``), in sequence order."""
        seen: dict[int, TransUNetEncoder] = {}
        for encoder in self.encoders.values():
            seen.setdefault(id(encoder), encoder)
        return list(seen.values())

    def load_encoder_weights(self, weights: Mapping[str, np.ndarray]) -> list[LoadReport]:
        """Load Google-layout npz ``weights`` into every distinct encoder."""
        return [load_google_npz(encoder, weights) for encoder in self.unique_encoders()]

    def _check_input(self, x: Tensor, sequence_mask: Tensor | None) -> Tensor | None:
        size, seqs = self.config.backbone.img_size, self.config.num_sequences
        if not isinstance(x, Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != (seqs, size, size):
            raise ValueError(
                f"expected input [B, {seqs}, {size}, {size}] with channels "
                f"{list(self.config.sequences)}, got {tuple(getattr(x, 'shape', ()))}"
            )
        return check_sequence_mask(sequence_mask, x.shape[0], seqs)

    def _main(
        self, x: Tensor, sequence_mask: Tensor | None
    ) -> tuple[Tensor, Tensor, list[Tensor], list[list[Tensor]], list[Tensor]]:
        """Main path shared by both forwards: (logits, class embeddings, enhanced, skips,
        encoder bottlenecks)."""
        mask = self._check_input(x, sequence_mask)
        encoded = [self.encoders[seq](x[:, i:i + 1])
                   for i, seq in enumerate(self.config.sequences)]
        features = [f for f, _ in encoded]
        skips = [s for _, s in encoded]
        enhanced, fused = self.cmfe(features, self.modality_priors, mask)
        anchored = (presence_weights(anchor_mask(mask, self.config.sequences, x.shape[0],
                                                 x.device), len(features))
                    if self.config.anchor_skips else None)
        fused_skips = self.skip_fusion(skips, presence_weights(mask, len(features)), anchored)
        decoded = self.decoder(fused, fused_skips)
        modulated = self.cfm(self.class_priors, fused.mean(dim=(2, 3)), self.modality_priors,
                             mask)
        logits = self.head(decoded, modulated.classes, modulated.context)
        return logits, modulated.classes, enhanced, skips, features

    def forward(self, x: Tensor, sequence_mask: Tensor | None = None) -> Tensor:
        """Main logits [B, K, H, W]; ``sequence_mask`` [B, S] bool marks present sequences."""
        return self._main(x, sequence_mask)[0]

    def forward_train(self, x: Tensor, sequence_mask: Tensor | None = None) -> IMMSegOutput:
        """Main logits plus, per sequence, aux logits and pixel embeddings at H/4.

        Aux outputs of absent sequences are still computed (from whatever their channel holds);
        the loss should give them zero weight. Their inputs are detached per sample: the aux
        branch's BatchNorm mixes samples, so an absent sample would otherwise still pass
        gradient back into its encoder, where GroupNorm over a constant (zeroed) image
        amplifies it by up to ``1 / sqrt(eps)``.
        """
        logits, classes, enhanced, skips, features = self._main(x, sequence_mask)
        mask = self._check_input(x, sequence_mask)
        aux_logits: list[Tensor] = []
        embeddings: list[Tensor] = []
        for i, seq in enumerate(self.config.sequences):
            feature, skip = enhanced[i], skips[i][AUX_SKIP]
            if mask is not None:
                present = mask[:, i, None, None, None]
                feature = torch.where(present, feature, feature.detach())
                skip = torch.where(present, skip, skip.detach())
            own = self.cfm(self.class_priors, feature.mean(dim=(2, 3)),
                           self.modality_priors[i:i + 1])
            aux, embedding = self.aux[seq](feature, skip, own.classes, own.context)
            aux_logits.append(aux)
            embeddings.append(embedding)
        if self.config.contrastive != "release":
            return IMMSegOutput(logits, tuple(aux_logits), tuple(embeddings), classes,
                                sequence_features=tuple(features))
        scales = []
        for i, seq in enumerate(self.config.sequences):
            raw = skips[i]  # not enhanced, as in the release
            if mask is not None:
                present = mask[:, i, None, None, None]
                raw = [torch.where(present, s, s.detach()) for s in raw]
            scales.append(tuple(head(s) for head, s in
                                zip(self.contrast_heads[seq], raw, strict=True)))
        return IMMSegOutput(
            logits, tuple(aux_logits), tuple(embeddings), classes, tuple(scales),
            tuple(project(self.class_priors) for project in self.contrast_texts),
            tuple(RELEASE_IGNORED.get(seq, ()) for seq in self.config.sequences),
            tuple(features))

    def extra_repr(self) -> str:
        params = sum(p.numel() for p in self.parameters())
        return (f"name={self.name!r}, sequences={list(self.config.sequences)}, "
                f"use_priors={self.config.use_priors}, parameters={params / 1e6:.2f}M")
