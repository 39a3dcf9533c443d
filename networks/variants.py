"""The network variants compared in the paper, built by name from one backbone name.

``variant`` picks the architecture, ``backbone`` (``--vit_name``) the encoder size:

* ``immseg``: one encoder per sequence, text-prior-guided fusion and class modulation (needs a
  :class:`~prompts.bank.PriorBank`);
* ``immseg_noprior``: the same network with learned vectors in place of the text embeddings,
  the ablation that isolates what the text contributes;
* ``transunet``: early fusion, the three sequences stacked as input channels;
* ``transunet_single``: one sequence only (``sequence``), the single-modality baseline.

Every variant maps ``[B, S, H, W]`` (channels in ``datasets.labels.MODALITIES`` order) to logits
``[B, K, H, W]``. :func:`network_record` and :func:`network_from_record` carry a network through
a checkpoint: the record holds the variant and its config, the state_dict the weights (and the
frozen priors), so no prompt file or npz is needed to rebuild it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from datasets.labels import CLASS_NAMES, MODALITIES
from networks.configs import TransUNetConfig
from networks.factory import create_model_from_config, list_models, model_config
from networks.immseg import IMMSeg, IMMSegConfig
from networks.npz_loader import load_google_npz, read_npz
from networks.transunet import TransUNet
from prompts.bank import PriorBank

log = logging.getLogger(__name__)

VARIANTS: Mapping[str, str] = {
    "immseg": "per-sequence encoders + text-prior fusion and class modulation",
    "immseg_noprior": "immseg with learned vectors in place of the text priors (ablation)",
    "transunet": "early-fusion TransUNet (sequences stacked as channels)",
    "transunet_single": "TransUNet on one sequence",
}


class SingleSequenceTransUNet(TransUNet):
    """TransUNet that reads one channel of the multi-sequence input (a 1-channel network)."""

    def __init__(self, config: TransUNetConfig, sequence: str,
                 sequences: Sequence[str] = MODALITIES, name: str = "transunet_single") -> None:
        sequences = tuple(sequences)
        if sequence not in sequences:
            raise ValueError(f"sequence must be one of {sequences}, got {sequence!r}")
        if config.in_channels != 1:
            raise ValueError(f"a single-sequence network has 1 input channel, got "
                             f"{config.in_channels}")
        super().__init__(config, name=name)
        self.sequence = sequence
        self.sequences = sequences
        self.sequence_index = sequences.index(sequence)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != len(self.sequences):
            raise ValueError(f"expected input [B, {len(self.sequences)}, H, W] with channels "
                             f"{list(self.sequences)}, got {tuple(x.shape)}")
        return super().forward(x[:, self.sequence_index:self.sequence_index + 1])


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown model variant {variant!r}; known: {sorted(VARIANTS)}")


def create_network(
    variant: str,
    *,
    backbone: str = "R50-ViT-B_16",
    img_size: int = 128,
    num_classes: int = len(CLASS_NAMES),
    sequences: Sequence[str] = MODALITIES,
    sequence: str = "LGE",
    priors: PriorBank | None = None,
    share_encoder: bool = False,
    pretrained: str | os.PathLike[str] | None = None,
    dropout_rate: float | None = None,
    cross_attention: str = "sequence",
    pixel_values: str = "own",
) -> nn.Module:
    """Build ``variant`` on ``backbone``; ``pretrained`` is a Google R50+ViT npz for every encoder.

    ``dropout_rate`` replaces the backbone's transformer dropout (0 makes training deterministic
    across process counts, which the distributed tests rely on).

    ``cross_attention`` and ``pixel_values`` choose the I_MMSeg variants' exchange between
    sequences (see :mod:`networks.prior_attention`).

    ``priors`` is required by ``immseg`` and refused by the others, so a run cannot silently
    train without the text it was meant to use (or pretend to use text it ignores).
    """
    _check_variant(variant)
    if backbone not in list_models():
        raise ValueError(f"unknown backbone {backbone!r}; known: {list_models()}")
    sequences = tuple(sequences)
    if variant == "immseg" and priors is None:
        raise ValueError("the immseg variant needs a prior bank (encode prompts/priors.toml "
                         "with `python -m prompts.encode` and pass its file)")
    if variant != "immseg" and priors is not None:
        raise ValueError(f"the {variant} variant uses no text priors; do not pass a prior bank")

    channels = len(sequences) if variant == "transunet" else 1
    config = model_config(backbone, img_size=img_size, in_channels=channels,
                          num_classes=num_classes)
    if dropout_rate is not None:
        config = dataclasses.replace(
            config, vit=dataclasses.replace(config.vit, dropout_rate=dropout_rate))
    model: nn.Module
    if variant == "transunet":
        model = TransUNet(config, name=backbone)
    elif variant == "transunet_single":
        model = SingleSequenceTransUNet(config, sequence, sequences, name=backbone)
    else:
        immseg_config = IMMSegConfig(
            backbone=config, sequences=sequences, share_encoder=share_encoder,
            use_priors=variant == "immseg", cross_attention=cross_attention,
            pixel_values=pixel_values,
            prior_dim=priors.dim if priors is not None else IMMSegConfig().prior_dim)
        model = IMMSeg(
            immseg_config,
            modality_priors=priors.modality_matrix(sequences) if priors is not None else None,
            class_priors=priors.class_matrix(CLASS_NAMES[:num_classes])
            if priors is not None else None,
            name=backbone)
    model.variant = variant
    if pretrained is not None:
        _load_pretrained(model, pretrained)
    return model


def _encoders(model: nn.Module) -> list[nn.Module]:
    if isinstance(model, IMMSeg):
        return list(model.unique_encoders())
    return [model.encoder]


def _load_pretrained(model: nn.Module, path: str | os.PathLike[str]) -> None:
    arrays = read_npz(path)
    for encoder in _encoders(model):
        report = load_google_npz(encoder, arrays)
        log.info("loaded %d encoder tensors from %s (unused keys: %s; position grid resized: "
                 "%s; input channels adapted: %s)", len(report.loaded), path,
                 list(report.unused), report.resized_pos_embed, report.adapted_in_channels)


def network_record(model: nn.Module) -> dict[str, Any]:
    """What a checkpoint needs besides the state_dict to rebuild ``model``."""
    variant = getattr(model, "variant", None)
    _check_variant(variant)
    record: dict[str, Any] = {"variant": variant, "name": model.name,
                              "config": model.config.to_dict()}
    if isinstance(model, SingleSequenceTransUNet):
        record["sequence"] = model.sequence
        record["sequences"] = list(model.sequences)
    return record


def network_from_record(record: Mapping[str, Any],
                        state_dict: Mapping[str, Tensor] | None = None) -> nn.Module:
    """Rebuild the network of :func:`network_record` and load ``state_dict`` when given.

    An ``immseg`` record needs the state_dict: its frozen priors live there.
    """
    variant = record.get("variant")
    _check_variant(variant)
    name, config = record["name"], record["config"]
    model: nn.Module
    if variant in ("immseg", "immseg_noprior"):
        immseg_config = IMMSegConfig.from_dict(config)
        if immseg_config.use_priors != (variant == "immseg"):
            raise ValueError(f"record says {variant!r} but its config has use_priors="
                             f"{immseg_config.use_priors}")
        if immseg_config.use_priors:
            if state_dict is None:
                raise ValueError("rebuilding immseg needs the state_dict (it holds the priors)")
            model = IMMSeg.from_state_dict(immseg_config, state_dict, name=name)
            state_dict = None
        else:
            model = IMMSeg(immseg_config, name=name)
    elif variant == "transunet_single":
        model = SingleSequenceTransUNet(TransUNetConfig.from_dict(config), record["sequence"],
                                        record["sequences"], name=name)
    else:
        model = create_model_from_config(name, config)
    model.variant = variant
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model


def input_size(model: nn.Module) -> int:
    """Side of the square input the network was built for."""
    config = model.config
    return int(config.backbone.img_size if isinstance(config, IMMSegConfig) else config.img_size)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Parameters (each shared module counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def describe(model: nn.Module) -> str:
    """One log line: variant, backbone, parameters."""
    return (f"{getattr(model, 'variant', '?')} on {model.name}: "
            f"{count_parameters(model) / 1e6:.1f}M trainable parameters")
