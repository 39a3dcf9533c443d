"""The network variants compared in the paper: a registry of builders, chosen by name.

``variant`` (``--model``) picks the architecture, ``backbone`` (``--vit_name``, see
:mod:`networks.backbones`) the encoder size. Each variant is one :class:`VariantSpec` registered
with :func:`register_variant`: its network class (whose ``capabilities`` say what it can do, see
:mod:`networks.capabilities`), whether it needs a text prior bank, which build options it takes,
and how to build it fresh or rebuild it from a checkpoint record. Registered:

* ``immseg``: one encoder per sequence, text-prior-guided fusion and class modulation (needs a
  :class:`~prompts.bank.PriorBank`);
* ``immseg_noprior``: the same network with learned vectors in place of the text embeddings,
  the ablation that isolates what the text contributes;
* ``transunet``: early fusion, the three sequences stacked as input channels;
* ``transunet_single``: one sequence only (``sequence``), the single-modality baseline;
* ``immseg_released``: the released I_MMSeg network module for module (its state dict loads;
  :mod:`networks.immseg_released`), bSSFP, LGE and T2w always.

Every variant maps ``[B, S, H, W]`` (channels in ``datasets.labels.MODALITIES`` order) to logits
``[B, K, H, W]``. :func:`network_record` and :func:`network_from_record` carry a network through
a checkpoint: the record holds the variant and its config, the state_dict the weights (and the
frozen priors), so no prompt file or npz is needed to rebuild it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from datasets.labels import CLASS_NAMES, MODALITIES
from networks.backbones import backbone_config, list_backbones, transunet_from_config
from networks.capabilities import Capabilities
from networks.configs import TransUNetConfig
from networks.immseg import IMMSeg, IMMSegConfig
from networks.immseg_released import IMMSegReleased, ReleasedConfig
from networks.npz_loader import load_google_npz, read_npz
from networks.transunet import TransUNet
from prompts.bank import PriorBank

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildRequest:
    """What :func:`create_network` was asked for, handed to a variant's builder."""

    name: str  # the backbone's name (model.name)
    config: TransUNetConfig  # the backbone, with the variant's input channel count
    sequences: tuple[str, ...]
    sequence: str
    priors: PriorBank | None
    options: Mapping[str, Any]  # the variant's own options (VariantSpec.options), as given


@dataclass(frozen=True)
class VariantSpec:
    """One registered architecture.

    ``build`` makes a fresh network from a :class:`BuildRequest`; ``rebuild`` makes one from a
    checkpoint record (and the state_dict, which holds immseg's frozen priors). ``options`` are
    the build options only this variant understands, with their defaults: passing one of them
    to another variant (other than at its default) is refused. ``train_defaults`` are training
    settings whose default is this variant's own (a :class:`trainer.TrainConfig` field left
    unset takes it), chosen by a measurement named where it is set.
    """

    name: str
    description: str
    network: type[nn.Module]
    build: Callable[[BuildRequest], nn.Module]
    rebuild: Callable[[Mapping[str, Any], Mapping[str, Tensor] | None], nn.Module]
    text_priors: bool = False
    #: input channels of the backbone: one per sequence (early fusion) or 1 (per-sequence
    #: encoders, or a single sequence)
    stacked_input: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)
    train_defaults: Mapping[str, Any] = field(default_factory=dict)

    @property
    def capabilities(self) -> Capabilities:
        return self.network.capabilities


_REGISTRY: dict[str, VariantSpec] = {}
#: The registered variants by name (a read-only view of the registry).
VARIANTS: Mapping[str, VariantSpec] = types.MappingProxyType(_REGISTRY)


def register_variant(spec: VariantSpec) -> VariantSpec:
    """Add ``spec`` to the registry (names are unique)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"variant {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def variant_spec(variant: str) -> VariantSpec:
    """The registered spec of ``variant``; a clear error naming the known ones otherwise."""
    if variant not in _REGISTRY:
        raise ValueError(f"unknown model variant {variant!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[variant]


class SingleSequenceTransUNet(TransUNet):
    """TransUNet that reads one channel of the multi-sequence input (a 1-channel network)."""

    variant = "transunet_single"
    capabilities = Capabilities(single_sequence=True)

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


#: Build options of the I_MMSeg variants (see networks.prior_attention) and their defaults.
_IMMSEG_OPTIONS = {name: getattr(IMMSegConfig, name)
                   for name in ("share_encoder", "cross_attention", "pixel_values", "contrastive",
                                "anchor_skips")}


def _build_immseg(request: BuildRequest, use_priors: bool) -> IMMSeg:
    priors = request.priors
    config = IMMSegConfig(
        backbone=request.config, sequences=request.sequences, use_priors=use_priors,
        prior_dim=priors.dim if priors is not None else IMMSegConfig().prior_dim,
        **{**_IMMSEG_OPTIONS, **request.options})
    num_classes = request.config.num_classes
    return IMMSeg(
        config,
        modality_priors=priors.modality_matrix(request.sequences) if priors else None,
        class_priors=priors.class_matrix(CLASS_NAMES[:num_classes]) if priors else None,
        name=request.name)


def _rebuild_immseg(record: Mapping[str, Any], state_dict: Mapping[str, Tensor] | None,
                    use_priors: bool) -> IMMSeg:
    config = IMMSegConfig.from_dict(record["config"])
    if config.use_priors != use_priors:
        raise ValueError(f"record says {record['variant']!r} but its config has use_priors="
                         f"{config.use_priors}")
    if not use_priors:
        return IMMSeg(config, name=record["name"])
    if state_dict is None:
        raise ValueError("rebuilding immseg needs the state_dict (it holds the priors)")
    return IMMSeg.from_state_dict(config, state_dict, name=record["name"])


#: immseg trains with per-sequence misalignment of bSSFP and T2w by default (ours, not the
#: release's): cross-validated on the 30 MyoPS 2020 cases it cost at most 1.3 Dice points on
#: aligned cases and lowered what misalignment costs in every group (docs/misalignment.md,
#: "Training with jitter, cross-validated"). immseg_noprior, its ablation, trains the same way.
_IMMSEG_TRAINING = {"sequence_jitter": 0.5}

register_variant(VariantSpec(
    "immseg", "per-sequence encoders + text-prior fusion and class modulation", IMMSeg,
    build=lambda request: _build_immseg(request, use_priors=True),
    rebuild=lambda record, state: _rebuild_immseg(record, state, use_priors=True),
    text_priors=True, options=_IMMSEG_OPTIONS, train_defaults=_IMMSEG_TRAINING))
register_variant(VariantSpec(
    "immseg_noprior", "immseg with learned vectors in place of the text priors (ablation)",
    IMMSeg,
    build=lambda request: _build_immseg(request, use_priors=False),
    rebuild=lambda record, state: _rebuild_immseg(record, state, use_priors=False),
    options=_IMMSEG_OPTIONS, train_defaults=_IMMSEG_TRAINING))
register_variant(VariantSpec(
    "transunet", "early-fusion TransUNet (sequences stacked as channels)", TransUNet,
    build=lambda request: TransUNet(request.config, name=request.name),
    rebuild=lambda record, state: transunet_from_config(record["name"], record["config"]),
    stacked_input=True))
register_variant(VariantSpec(
    "transunet_single", "TransUNet on one sequence", SingleSequenceTransUNet,
    build=lambda request: SingleSequenceTransUNet(request.config, request.sequence,
                                                  request.sequences, name=request.name),
    rebuild=lambda record, state: SingleSequenceTransUNet(
        TransUNetConfig.from_dict(record["config"]), record["sequence"], record["sequences"],
        name=record["name"])))


def _build_released(request: BuildRequest) -> IMMSegReleased:
    if request.sequences != MODALITIES:
        raise ValueError(f"immseg_released reads {list(MODALITIES)} (as released), not "
                         f"{list(request.sequences)}")
    priors = request.priors
    assert priors is not None  # create_network demands a bank for text-prior variants
    return IMMSegReleased(
        ReleasedConfig(backbone=request.config, prior_dim=priors.dim),
        priors.modality_matrix(MODALITIES),
        priors.class_matrix(CLASS_NAMES[:request.config.num_classes]), name=request.name)


def _rebuild_released(record: Mapping[str, Any],
                      state_dict: Mapping[str, Tensor] | None) -> IMMSegReleased:
    if state_dict is None or not {"modality_priors", "class_priors"} <= set(state_dict):
        raise ValueError("rebuilding immseg_released needs the state_dict with its priors")
    return IMMSegReleased(ReleasedConfig.from_dict(record["config"]),
                          state_dict["modality_priors"], state_dict["class_priors"],
                          name=record["name"])


register_variant(VariantSpec(
    "immseg_released", "the released I_MMSeg network, module for module (its weights load)",
    IMMSegReleased, build=_build_released, rebuild=_rebuild_released, text_priors=True))


def create_network(
    variant: str,
    *,
    backbone: str = "R50-ViT-B_16",
    img_size: int = 128,
    num_classes: int = len(CLASS_NAMES),
    sequences: Sequence[str] = MODALITIES,
    sequence: str = "LGE",
    priors: PriorBank | None = None,
    pretrained: str | os.PathLike[str] | None = None,
    dropout_rate: float | None = None,
    **options: Any,
) -> nn.Module:
    """Build ``variant`` on ``backbone``; ``pretrained`` is a Google R50+ViT npz for every encoder.

    ``dropout_rate`` replaces the backbone's transformer dropout (0 makes training deterministic
    across process counts, which the distributed tests rely on). ``options`` are the variant's
    own (:attr:`VariantSpec.options`; for the I_MMSeg variants ``share_encoder``,
    ``cross_attention`` and ``pixel_values``, see :mod:`networks.prior_attention`).

    ``priors`` is required by ``immseg`` and refused by the others, so a run cannot silently
    train without the text it was meant to use (or pretend to use text it ignores).
    """
    spec = variant_spec(variant)
    if backbone not in list_backbones():
        raise ValueError(f"unknown backbone {backbone!r}; known: {list_backbones()}")
    if spec.text_priors and priors is None:
        raise ValueError(f"the {variant} variant needs a prior bank (encode prompts/priors.toml "
                         "with `python -m prompts.encode` and pass its file)")
    if not spec.text_priors and priors is not None:
        raise ValueError(f"the {variant} variant uses no text priors; do not pass a prior bank")
    check_options(variant, options)
    sequences = tuple(sequences)
    config = backbone_config(backbone, img_size=img_size,
                             in_channels=len(sequences) if spec.stacked_input else 1,
                             num_classes=num_classes)
    if dropout_rate is not None:
        config = dataclasses.replace(
            config, vit=dataclasses.replace(config.vit, dropout_rate=dropout_rate))
    model = spec.build(BuildRequest(backbone, config, sequences, sequence, priors, options))
    if pretrained is not None:
        _load_pretrained(model, pretrained)
    return model


def option_names() -> list[str]:
    """Every build option some registered variant takes, sorted."""
    return sorted({key for spec in _REGISTRY.values() for key in spec.options})


def check_options(variant: str, options: Mapping[str, Any]) -> None:
    """Refuse build options ``variant`` does not take (unless at their neutral defaults)."""
    spec = variant_spec(variant)
    known = set(option_names())
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown build option(s) {unknown}; known: {sorted(known)}")
    foreign = sorted(key for key, value in options.items() if key not in spec.options
                     and any(value != other.options[key] for other in _REGISTRY.values()
                             if key in other.options))
    if foreign:
        raise ValueError(f"{', '.join(foreign)} configure(s) a variant other than {variant}; "
                         f"the {variant} model has no such setting")


def _encoders(model: nn.Module) -> list[nn.Module]:
    if isinstance(model, IMMSeg):
        return list(model.unique_encoders())
    if isinstance(model, IMMSegReleased):
        raise ValueError("immseg_released trains its encoders from scratch, as the release does "
                         "(its train.py never loads the npz); drop --pretrained_path")
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
    spec = variant_spec(variant)
    if not isinstance(model, spec.network):
        raise ValueError(f"a {type(model).__name__} is not a {variant} network")
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
    model = variant_spec(record.get("variant")).rebuild(record, state_dict)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model


def input_size(model: nn.Module) -> int:
    """Side of the square input the network was built for."""
    config = model.config
    return int(config.backbone.img_size if isinstance(config, IMMSegConfig | ReleasedConfig)
               else config.img_size)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Parameters (each shared module counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def describe(model: nn.Module) -> str:
    """One log line: variant, backbone, parameters."""
    return (f"{model.variant} on {model.name}: "
            f"{count_parameters(model) / 1e6:.1f}M trainable parameters")
