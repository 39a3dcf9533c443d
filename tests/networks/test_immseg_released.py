"""immseg_released: the released network's state-dict layout, its blocks against hand-computed
values, the fixes that keep its weights loadable, and the authors' weights through test.py's
loader.

The expected tensors below were derived from reading the release's module definitions
(docs/release_facts.md sections 2-4), not from our code: per-module parameter counts, the total
(84,975,359 in 934 tensors for R50-ViT-B_16 at 128 px, 4 classes) and a sample of names with
their shapes.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from datasets.labels import CLASS_NAMES, MODALITIES
from networks.checkpoint import load_release_weights
from networks.immseg_released import (
    PRIOR_KEYS,
    ClassModulation,
    IMMSegReleased,
    PredictionHead,
    ReleaseResNet,
    ReleaseWeightsError,
    _pixel_exchange,
    load_release_state_dict,
)
from networks.variants import create_network, network_from_record, network_record
from prompts.bank import load_released_priors
from tests.helpers import random_bank

#: Parameters per top-level module of the release (R50-ViT-B_16, 128 px, 4 classes).
RELEASE_MODULES = {
    **{f"transformer{k}": 11_894_848 for k in (1, 2, 3)},
    **{f"decoder{k}": 8_566_848 for k in (1, 2, 3, 4)},
    "feature_fusion": 996_992, "text_to_64": 512 * 64 + 64, "text_to_128": 512 * 128 + 128,
    "text_to_256": 512 * 256 + 256, "text_to_vision": 512 * 256 + 256,
    "modal_text_to_vision": 512 * 256 + 256, "modal_text_to_weight": 73_920,
    "dec_output_fusion": 800,
    **{f"{m}_{s}": n for s in ("cine", "psir", "t2w") for m, n in (
        ("GAP", 262_400), ("mix", 3_147_776), ("CBAMFeatureReducer", 196_706),
        ("Class_Feature_Modulation", 264), ("class_MLP_dec", 10_336), ("class_MLP", 147_776))},
    **{f"{p}_embed": 254_848 for p in ("fusion", "cine", "psir", "t2w")},
    **{f"forward_prediction_head{k}": 228_349 for k in ("", "1", "2", "3", "4")},
    **{f"segmentation_head{k}": 580 for k in ("", "1", "2", "3")},
}
RELEASE_SHAPES = {
    "transformer1.embeddings.hybrid_model.root.conv.weight": (64, 3, 7, 7),
    "transformer2.embeddings.hybrid_model.body.block1.unit1.downsample.weight": (256, 64, 1, 1),
    "transformer2.embeddings.hybrid_model.body.block1.unit1.gn_proj.bias": (256,),
    "transformer3.embeddings.hybrid_model.body.block3.unit9.conv2.weight": (256, 256, 3, 3),
    "transformer3.embeddings.hybrid_model.body.block2.unit1.conv2.weight": (128, 128, 3, 3),
    "decoder1.conv_more.0.weight": (512, 1024, 3, 3),
    "decoder2.blocks.2.conv1.0.weight": (64, 192, 3, 3),
    "decoder4.blocks.3.conv2.1.running_var": (16,),
    "feature_fusion.fusion1.fusion_proj.weight": (512, 1536, 1, 1),
    "feature_fusion.fusion3.norm.num_batches_tracked": (),
    "GAP_psir.1.weight": (256, 1024, 1, 1),
    "modal_text_to_weight.0.fc2.weight": (64, 128),
    "mix_t2w.fusion_proj.weight": (1024, 3072, 1, 1),
    "CBAMFeatureReducer_cine.cbam.channel_att.mlp.0.weight": (64, 1024),
    "CBAMFeatureReducer_cine.cbam.channel_att.mlp.2.weight": (1024, 64),
    "CBAMFeatureReducer_cine.cbam.spatial_att.conv.weight": (1, 2, 7, 7),
    "CBAMFeatureReducer_cine.conv1x1.weight": (64, 1024, 1, 1),
    "Class_Feature_Modulation_psir.fc.weight": (8, 32),
    "class_MLP_dec_t2w.fc1.weight": (64, 128),
    "class_MLP_cine.fc2.weight": (64, 256),
    "psir_embed.features256_to_128.3.weight": (128, 128, 1, 1),
    "fusion_embed.features512_to_256.0.weight": (256, 512, 1, 1),
    "forward_prediction_head.controller.weight": (25, 512, 1, 1),
    "forward_prediction_head2.Gap_64.3.weight": (256, 64, 1, 1),
    "forward_prediction_head4.GAP_512.0.weight": (512,),
    "forward_prediction_head1.precls_conv.2.bias": (4,),
    "dec_output_fusion.fusion_proj.weight": (16, 48, 1, 1),
    "segmentation_head3.0.weight": (4, 16, 3, 3),
}


@pytest.fixture(scope="module")
def r50():
    torch.manual_seed(0)
    return create_network("immseg_released", backbone="R50-ViT-B_16", img_size=128,
                          priors=random_bank(dim=512)).eval()


def test_state_dict_is_the_releases(r50):
    state = {k: v for k, v in r50.state_dict().items() if k not in PRIOR_KEYS}
    assert len(state) == 934
    assert sum(p.numel() for p in r50.parameters()) == 84_975_359
    counts = {name: sum(p.numel() for p in child.parameters())
              for name, child in r50.named_children()}
    assert counts == RELEASE_MODULES
    for key, shape in RELEASE_SHAPES.items():
        assert tuple(state[key].shape) == shape, key


def test_the_authors_state_dict_loads_and_predicts_the_same(r50, tmp_path):
    # A stand-in for epoch_299.pth: the release's tensors, saved from nn.DataParallel.
    released = {f"module.{k}": v.clone() for k, v in r50.state_dict().items()
                if k not in PRIOR_KEYS}
    path = tmp_path / "epoch_299.pth"
    torch.save(released, path)
    bank = random_bank(dim=512)
    loaded = load_release_weights(path, bank, torch.device("cpu"))
    assert loaded.model.variant == "immseg_released" and loaded.img_size == 128
    # The weights are the file's; the texts are the bank's, by name.
    torch.testing.assert_close(loaded.model.modality_priors[1], bank.embeddings["modality/LGE"])
    source = r50
    source.modality_priors.copy_(loaded.model.modality_priors)
    source.class_priors.copy_(loaded.model.class_priors)
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), source(x))
    # Rebuilt from our record (as our checkpoints carry it), the priors come along.
    rebuilt = network_from_record(network_record(loaded.model), loaded.model.state_dict())
    assert torch.equal(rebuilt.class_priors, loaded.model.class_priors)


def test_foreign_or_damaged_state_dicts_are_refused_naming_the_problem(r50):
    state = {k: v for k, v in r50.state_dict().items() if k not in PRIOR_KEYS}
    without = dict(state)
    del without["mix_cine.fusion_proj.weight"]
    with pytest.raises(ReleaseWeightsError, match=r"missing: mix_cine\.fusion_proj\.weight"):
        load_release_state_dict(r50, without, "w.pth")
    reshaped = dict(state, **{"decoder1.conv_more.0.weight": torch.zeros(512, 768, 3, 3)})
    with pytest.raises(ReleaseWeightsError, match=r"shape differs: decoder1\.conv_more"):
        load_release_state_dict(r50, reshaped, "w.pth")
    extra = dict(state, **{"transformer1.encoder.encoder_norm.weight": torch.zeros(768)})
    with pytest.raises(ReleaseWeightsError, match=r"unexpected: transformer1\.encoder"):
        load_release_state_dict(r50, extra, "w.pth")


def test_resnet_pads_block1_as_released():
    torch.manual_seed(0)
    net = ReleaseResNet((1, 1, 1), width=32, groups=8)
    bottleneck, skips = net(torch.rand(1, 3, 64, 64))
    assert [tuple(s.shape[-2:]) for s in skips] == [(32, 32), (16, 16), (8, 8)]
    assert tuple(bottleneck.shape) == (1, 512, 4, 4)
    # Max-pool without padding gives 15 x 15; the 16th row and column are zeros.
    assert torch.all(skips[1][..., 15, :] == 0) and torch.all(skips[1][..., :, 15] == 0)
    assert skips[1][..., :15, :15].abs().sum() > 0


def test_pixel_exchange_aggregates_the_querys_own_features():
    # Two pixels per map, two channels. |cos| of query pixel i with partner pixel j:
    query = torch.tensor([[1.0, 0.0], [0.0, 2.0]]).view(1, 2, 1, 2)  # pixels (1,0) and (0,2)
    partner = torch.tensor([[1.0, 1.0], [0.0, -1.0]]).view(1, 2, 1, 2)  # (1,0) and (1,-1)
    s = 2 ** -0.5
    cos = torch.tensor([[1.0, s], [0.0, s]])  # |cos| rows: query pixel 0, 1
    weights = torch.softmax(cos, dim=1)
    own = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # [C, N]
    expected = (own @ weights.T).view(1, 2, 1, 2)
    torch.testing.assert_close(_pixel_exchange(query, partner), expected)


def test_prediction_head_splits_its_generated_parameters_as_released():
    torch.manual_seed(0)
    head = PredictionHead((8, 8, 8), decoded=4)
    head.precls_conv = nn.Identity()  # feed the 4-channel head input directly
    params = torch.randn(2, 25)  # per class (2 classes here): w1 16, w2 4, b1 4, b2 1
    with torch.no_grad():
        head.controller.weight.zero_()
    x = torch.randn(1, 4, 3, 5)
    skips = [torch.rand(1, 8, 4, 4)] * 3
    outputs = []
    for c in range(2):
        with torch.no_grad():
            head.controller.bias.copy_(params[c])
        outputs.append(head(x, skips, torch.zeros(1, 256))[0, 0])
    for c in range(2):
        w1, w2 = params[c, :16].view(4, 4), params[c, 16:20]
        b1, b2 = params[c, 20:24], params[c, 24]
        pixels = x[0].flatten(1)  # [4, N]
        hidden = torch.relu(w1 @ pixels + b1[:, None])
        expected = (w2 @ hidden + b2).view(3, 5)
        torch.testing.assert_close(outputs[c], expected)


def test_class_modulation_is_a_scale_and_shift_per_class():
    film = ClassModulation(3, classes=2)
    with torch.no_grad():
        film.fc.weight.zero_()
        film.fc.bias.copy_(torch.tensor([0.5, 1.0, -1.0, 2.0]))  # gamma0, beta0, gamma1, beta1
    classes = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    out = film(torch.zeros(2, 3), classes)
    expected = torch.tensor([[1.5 + 1.0, 3.0 + 1.0], [0.0 + 2.0, 0.0 + 2.0]])
    assert out.shape == (2, 2, 2)
    torch.testing.assert_close(out[0], expected)
    torch.testing.assert_close(out[1], expected)


def _tiny(img_size=32):
    torch.manual_seed(0)
    return create_network("immseg_released", backbone="tiny", img_size=img_size,
                          priors=random_bank())


def test_per_sequence_predictions_do_not_depend_on_the_batch():
    """The release averages CFM's vector over the batch; ours is per sample."""
    model = _tiny().eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        together = model.forward_train(x)
        alone = model.forward_train(x[:1])
    for both, one in zip(together.aux_logits, alone.aux_logits, strict=True):
        torch.testing.assert_close(both[:1], one, atol=1e-5, rtol=1e-5)


def test_any_multiple_of_16_and_the_training_outputs():
    model = _tiny(48).train()  # bottleneck 3 x 3: the 8 x 8 gate is resized
    out = model.forward_train(torch.rand(2, 3, 48, 48))
    assert out.logits.shape == (2, len(CLASS_NAMES), 48, 48)
    assert [a.shape[-1] for a in out.aux_logits] == [48, 48, 48]
    assert [[e.shape[-1] for e in s] for s in out.scale_embeddings] == [[24, 12, 6]] * 3
    assert [t.shape for t in out.scale_texts] == [(4, 8), (4, 16), (4, 32)]
    # bSSFP leaves scar and edema out of its contrast, LGE and T2w the background (as released).
    assert out.ignored_classes == ((2, 3), (0,), (0,))
    with pytest.raises(ValueError, match="no missing-sequence handling"):
        model.forward_train(torch.rand(2, 3, 48, 48), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="reads"):
        create_network("immseg_released", backbone="tiny", img_size=32, priors=random_bank(),
                       sequences=("LGE", "T2w"))


def test_released_texts_feed_the_rows_the_authors_trained_with(priors_dir):
    raw = torch.load(priors_dir / "biomedclip_modality_prompts.pth", map_location="cpu")
    indexed = load_released_priors(priors_dir, normalize=False, order=MODALITIES)
    model = create_network("immseg_released", backbone="tiny", img_size=32, priors=indexed)
    # Row 0 of the file feeds bSSFP, whatever its text, as in the released forward.
    torch.testing.assert_close(model.modality_priors, raw.float())
    assert isinstance(model, IMMSegReleased)


def test_test_and_predict_take_the_authors_state_dict(priors_dir, tmp_path):
    """``--variant immseg_released``: the label-free path of test.py and predict.py runs the
    released network from a bare state dict and the release's text files."""
    import json

    import commands.predict as predict
    import commands.test as test_script
    from datasets.phantom import write_phantom_dataset
    from datasets.raw import discover_cases
    from preprocessing.pipeline import PreprocessConfig
    from preprocessing.runner import RunOptions, run_preprocessing

    raw, root = tmp_path / "raw", tmp_path / "processed"
    write_phantom_dataset(raw, 2, seed=5)
    run_preprocessing(raw, root, PreprocessConfig(affine_registration=False,
                                                  nonrigid_registration=False),
                      RunOptions(test_every=1, folds=0, qa=False))
    indexed = load_released_priors(priors_dir, normalize=False, order=MODALITIES)
    torch.manual_seed(0)
    model = create_network("immseg_released", backbone="tiny", img_size=128, priors=indexed)
    weights = tmp_path / "epoch_299.pth"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()
                if k not in PRIOR_KEYS}, weights)
    release = ["--variant", "immseg_released", "--checkpoint", str(weights), "--release_priors",
               str(priors_dir), "--release_backbone", "tiny", "--device", "cpu"]
    out = tmp_path / "test"
    assert test_script.main([*release, "--root_path", str(root), "--output_dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["space"] == "native" and len(summary["cases"]) == 2
    assert summary["settings"]["model"].startswith("immseg_released")
    case = discover_cases(raw)[0].case_id
    target = tmp_path / "pred" / f"{case}.nii.gz"
    assert predict.main([*release, "--case_dir", str(raw), "--case_id", case, "--out",
                         str(target)]) == 0
    assert target.is_file()
    # Without the texts, or with a framework checkpoint: one clear error, exit 1.
    assert test_script.main([*release[:4], "--root_path", str(root)]) == 1
