"""Variants by name: shapes, checkpoint records, priors keyed by name, pretrained encoders."""

from __future__ import annotations

import inspect

import pytest
import torch

from datasets.labels import CLASS_NAMES, MODALITIES
from networks.backbones import backbone_config
from networks.capabilities import capabilities_of
from networks.immseg import IMMSeg
from networks.npz_loader import write_google_npz
from networks.transunet import TransUNetEncoder
from networks.variants import (
    VARIANTS,
    create_network,
    input_size,
    network_from_record,
    network_record,
    register_variant,
)
from prompts.bank import load_released_priors
from tests.helpers import random_bank


def _build(variant: str, **kwargs) -> torch.nn.Module:
    priors = random_bank() if VARIANTS[variant].text_priors else None
    return create_network(variant, backbone="tiny", img_size=32, priors=priors, **kwargs)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_maps_three_sequences_to_class_logits(variant):
    torch.manual_seed(0)
    model = _build(variant).eval()
    assert model.variant == variant and input_size(model) == 32
    with torch.no_grad():
        logits = model(torch.rand(2, len(MODALITIES), 32, 32))
    assert logits.shape == (2, len(CLASS_NAMES), 32, 32)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_record_and_state_dict_rebuild_the_same_network(variant):
    torch.manual_seed(0)
    model = _build(variant).eval()
    record = network_record(model)
    rebuilt = network_from_record(record, model.state_dict()).eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))
    assert network_record(rebuilt) == record


def test_immseg_priors_are_stacked_by_name():
    bank = random_bank()
    model = create_network("immseg", backbone="tiny", img_size=32, priors=bank)
    for row, sequence in enumerate(MODALITIES):
        assert torch.equal(model.modality_priors[row], bank.embeddings[f"modality/{sequence}"])
    for row, label in enumerate(CLASS_NAMES):
        assert torch.equal(model.class_priors[row], bank.embeddings[f"class/{label}"])


def test_released_priors_reach_the_right_rows(priors_dir):
    """The released file stores LGE, bSSFP, T2w; the network must still see bSSFP first."""
    bank = load_released_priors(priors_dir)
    raw = torch.load(priors_dir / "biomedclip_modality_prompts.pth", map_location="cpu")
    model = create_network("immseg", backbone="tiny", img_size=32, priors=bank)
    expected_bssfp = torch.nn.functional.normalize(raw[1].float(), dim=0)
    assert MODALITIES[0] == "bSSFP"
    torch.testing.assert_close(model.modality_priors[0], expected_bssfp)
    assert model.config.prior_dim == 512


def test_priors_are_required_exactly_by_immseg():
    with pytest.raises(ValueError, match="needs a prior bank"):
        create_network("immseg", backbone="tiny", img_size=32)
    for variant in ("immseg_noprior", "transunet", "transunet_single"):
        with pytest.raises(ValueError, match="uses no text priors"):
            create_network(variant, backbone="tiny", img_size=32, priors=random_bank())
    with pytest.raises(ValueError, match="unknown model variant"):
        create_network("unet", backbone="tiny")
    with pytest.raises(ValueError, match="unknown backbone"):
        create_network("transunet", backbone="R99")
    with pytest.raises(ValueError, match="sequence must be one of"):
        create_network("transunet_single", backbone="tiny", img_size=32, sequence="T1")


def test_single_sequence_network_reads_only_its_sequence():
    torch.manual_seed(0)
    model = _build("transunet_single", sequence="T2w").eval()
    x = torch.rand(1, 3, 32, 32)
    other = x.clone()
    other[:, :2] = torch.rand(1, 2, 32, 32)  # bSSFP and LGE change, T2w does not
    with torch.no_grad():
        assert torch.equal(model(x), model(other))
        other[:, 2] += 1.0
        assert not torch.equal(model(x), model(other))


@pytest.mark.parametrize("variant", ["immseg", "immseg_noprior", "transunet"])
def test_google_npz_initialises_every_encoder(variant, tmp_path):
    torch.manual_seed(1)
    source = TransUNetEncoder.from_config(backbone_config("tiny", img_size=32), in_channels=3)
    path = write_google_npz(source, tmp_path / "tiny.npz")
    model = _build(variant, pretrained=path)
    encoders = model.unique_encoders() if isinstance(model, IMMSeg) else [model.encoder]
    assert len(encoders) == (3 if variant.startswith("immseg") else 1)
    for encoder in encoders:
        # Transformer weights are copied as they are; the root conv is adapted to 1 channel.
        torch.testing.assert_close(encoder.vit.encoder.layers[0].attention.query.weight,
                                   source.vit.encoder.layers[0].attention.query.weight)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_declared_capabilities_match_what_the_network_does(variant):
    """The registry's declarations are what consumers trust: check them against the code."""
    model = _build(variant)
    spec = VARIANTS[variant]
    assert isinstance(model, spec.network) and model.variant == variant
    declared = capabilities_of(model)
    assert declared == spec.capabilities
    assert declared.sequence_mask == (
        "sequence_mask" in inspect.signature(model.forward).parameters)
    assert declared.training_outputs == hasattr(model, "forward_train")
    assert declared.single_sequence == hasattr(model, "sequence")
    assert spec.text_priors == (variant in ("immseg", "immseg_released"))


def test_variant_options_go_only_to_the_variants_that_take_them():
    pixel = create_network("immseg_noprior", backbone="tiny", img_size=32,
                           cross_attention="pixel")
    assert pixel.config.cross_attention == "pixel"
    # At its neutral default an option is harmless for any variant (train.py passes them all).
    create_network("transunet", backbone="tiny", img_size=32, cross_attention="sequence")
    with pytest.raises(ValueError, match="cross_attention configure"):
        create_network("transunet", backbone="tiny", img_size=32, cross_attention="pixel")
    with pytest.raises(ValueError, match="unknown build option"):
        create_network("transunet", backbone="tiny", img_size=32, heads=3)


def test_a_name_registers_once():
    spec = VARIANTS["transunet"]
    with pytest.raises(ValueError, match="already registered"):
        register_variant(spec)
    with pytest.raises(TypeError):
        VARIANTS["copy"] = spec  # the public view is read-only
