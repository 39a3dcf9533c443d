from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from networks.backbones import backbone_config
from networks.configs import DecoderConfig
from networks.contrastive import PixelTextContrastiveLoss
from networks.immseg import IMMSeg, IMMSegConfig, IMMSegOutput, SkipFusion, anchor_mask
from networks.npz_loader import load_google_npz, read_npz, write_google_npz
from networks.transunet import TransUNetEncoder

SEQS = ("bSSFP", "LGE", "T2w")
K, P = 4, 24


def _config(img_size: int = 32, **kwargs) -> IMMSegConfig:
    backbone = backbone_config("tiny", img_size=img_size, in_channels=1, num_classes=K)
    small = {"prior_dim": P, "embed_dim": 16, "aux_channels": 8, "dynamic_hidden": 4}
    return IMMSegConfig(backbone=backbone, **{**small, **kwargs})


def _priors(seed: int = 0, num_sequences: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(num_sequences, P, generator=generator), dim=1),
            F.normalize(torch.randn(K, P, generator=generator), dim=1))


def _model(img_size: int = 32, seed: int = 0, **kwargs) -> IMMSeg:
    config = _config(img_size, **kwargs)
    torch.manual_seed(seed)
    if not config.use_priors:
        return IMMSeg(config)
    return IMMSeg(config, *_priors(num_sequences=config.num_sequences))


def _loss(out: IMMSegOutput, target: torch.Tensor) -> torch.Tensor:
    loss = F.cross_entropy(out.logits, target)
    contrastive = PixelTextContrastiveLoss()
    for aux, embedding in zip(out.aux_logits, out.pixel_embeddings, strict=True):
        small = F.interpolate(target[:, None].float(), size=aux.shape[-2:], mode="nearest")
        loss = loss + F.cross_entropy(aux, small[:, 0].long())
        loss = loss + 0.1 * contrastive(embedding, out.class_embeddings, target)[0]
    return loss


@pytest.mark.parametrize("img_size", [32, 64, 128])
@pytest.mark.parametrize("batch", [1, 2])
def test_output_shapes(img_size: int, batch: int) -> None:
    model = _model(img_size).train()
    out = model.forward_train(torch.randn(batch, 3, img_size, img_size))
    quarter = img_size // 4
    assert out.logits.shape == (batch, K, img_size, img_size)
    assert [a.shape for a in out.aux_logits] == [(batch, K, quarter, quarter)] * 3
    assert [e.shape for e in out.pixel_embeddings] == [(batch, 16, quarter, quarter)] * 3
    assert out.class_embeddings.shape == (batch, K, 16)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"use_priors": False}, {"share_encoder": True},
     {"sequences": ("LGE", "T2w"), "share_encoder": True, "use_priors": False},
     {"cross_attention": "pixel"}, {"cross_attention": "pixel", "pixel_values": "partner"},
     {"anchor_skips": 2}],
)
def test_gradients_reach_every_trainable_parameter(kwargs: dict) -> None:
    model = _model(**kwargs).train()
    x = torch.randn(2, model.config.num_sequences, 32, 32)
    _loss(model.forward_train(x), torch.randint(0, K, (2, 32, 32))).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    zero = [n for n, p in model.named_parameters()
            if p.grad is not None and not p.grad.abs().sum() > 0]
    assert missing == [], f"no gradient: {missing}"
    assert zero == [], f"zero gradient: {zero}"


def test_fewer_decoder_skips_leave_no_dead_fusion_layer() -> None:
    config = _config()
    backbone = dataclasses.replace(config.backbone, decoder=DecoderConfig(
        channels=(32, 16, 8, 8), n_skip=1, head_channels=64))
    torch.manual_seed(0)
    model = IMMSeg(dataclasses.replace(config, backbone=backbone), *_priors()).train()
    assert sorted(model.skip_fusion.fuse) == ["2"]
    _loss(model.forward_train(torch.randn(2, 3, 32, 32)),
          torch.randint(0, K, (2, 32, 32))).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_anchor_mask_keeps_lge_alone_where_a_sample_has_it() -> None:
    everything = anchor_mask(None, SEQS, 2, torch.device("cpu"))
    assert everything.tolist() == [[False, True, False]] * 2
    mask = torch.tensor([[True, True, True], [True, False, True], [False, True, False]])
    assert anchor_mask(mask, SEQS, 3, torch.device("cpu")).tolist() == [
        [False, True, False], [True, False, True], [False, True, False]]


def test_anchored_resolutions_ignore_the_other_sequences_skips() -> None:
    torch.manual_seed(0)
    fusion = SkipFusion((4, 6, 8), 3, n_skip=3, anchored=(0, 1)).eval()
    sizes = (16, 8, 4)
    skips = [[torch.randn(2, c, n, n) for c, n in zip((4, 6, 8), sizes, strict=True)]
             for _ in SEQS]
    moved = [list(skips[0]), list(skips[1]), list(skips[2])]
    for s in (0, 2):  # bSSFP and T2w change at every resolution
        moved[s] = [skip + torch.randn_like(skip) for skip in skips[s]]
    weights = torch.ones(2, 3)
    anchored = anchor_mask(None, SEQS, 2, torch.device("cpu")).float() * 3
    before, after = fusion(skips, weights, anchored), fusion(moved, weights, anchored)
    torch.testing.assert_close(before[0], after[0])
    torch.testing.assert_close(before[1], after[1])
    assert not torch.allclose(before[2], after[2])
    # without anchoring every resolution follows them
    plain = fusion(skips, weights), fusion(moved, weights)
    assert not torch.allclose(plain[0][0], plain[1][0])


def test_anchor_skips_is_recorded_and_checked() -> None:
    config = _config(anchor_skips=2)
    assert IMMSegConfig.from_dict(config.to_dict()).anchor_skips == 2
    model = _model(anchor_skips=2).eval()
    assert model.skip_fusion.anchored == (0, 1)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, K, 32, 32)
    for bad in (4, -1, True, 1.0):
        with pytest.raises(ValueError, match="anchor_skips"):
            _config(anchor_skips=bad)
    with pytest.raises(ValueError, match="needs LGE"):
        _config(anchor_skips=1, sequences=("bSSFP", "T2w"))


def test_priors_are_frozen_buffers() -> None:
    model = _model()
    names = {n for n, _ in model.named_parameters()}
    assert "modality_priors" not in names and "class_priors" not in names
    state = model.state_dict()
    torch.testing.assert_close(state["modality_priors"], _priors()[0])
    torch.testing.assert_close(state["class_priors"], _priors()[1])


def test_prior_content_changes_the_output() -> None:
    config = _config()
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    a = IMMSeg(config, *_priors(seed=0)).eval()
    b = IMMSeg(config, *_priors(seed=1)).eval()
    b.load_state_dict({**a.state_dict(), "modality_priors": b.modality_priors,
                       "class_priors": b.class_priors})
    modality, classes = _priors(seed=0)
    c = IMMSeg(config, modality[[1, 2, 0]], classes).eval()
    c.load_state_dict({**a.state_dict(), "modality_priors": c.modality_priors})
    with torch.no_grad():
        out_a, out_b, out_c = a(x), b(x), c(x)
    assert not torch.allclose(out_a, out_b, atol=1e-4)
    assert not torch.allclose(out_a, out_c, atol=1e-4)


def test_without_priors_learns_parameters() -> None:
    model = _model(use_priors=False)
    params = dict(model.named_parameters())
    assert params["modality_priors"].shape == (3, P)
    assert params["class_priors"].shape == (K, P)
    torch.testing.assert_close(params["class_priors"].norm(dim=1), torch.ones(K))
    with pytest.raises(ValueError, match="use_priors=False"):
        IMMSeg(_config(use_priors=False), *_priors())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model) == count(_model()) + (3 + K) * P


def test_priors_are_required_and_checked() -> None:
    modality, classes = _priors()
    config = _config()
    with pytest.raises(ValueError, match="class_priors"):
        IMMSeg(config, modality)
    with pytest.raises(ValueError, match="modality_priors"):
        IMMSeg(config, modality[:2], classes)
    with pytest.raises(ValueError, match="class_priors"):
        IMMSeg(config, modality, classes[:, :-1])
    with pytest.raises(ValueError, match="non-finite"):
        IMMSeg(config, modality, classes * float("nan"))
    with pytest.raises(ValueError, match="floating"):
        IMMSeg(config, modality, classes.long())


def test_shared_encoder() -> None:
    shared, separate = _model(share_encoder=True), _model()
    assert len(shared.unique_encoders()) == 1 and len(separate.unique_encoders()) == 3
    assert shared.encoders["bSSFP"] is shared.encoders["T2w"]
    assert shared.aux["bSSFP"] is shared.aux["LGE"]
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    encoder = count(separate.encoders["LGE"])
    assert count(separate) - count(shared) > 2 * encoder


def test_eval_forward_is_the_train_output_logits() -> None:
    model = _model().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        assert isinstance(logits, torch.Tensor)
        torch.testing.assert_close(logits, model.forward_train(x).logits)


@pytest.mark.parametrize("shape", [(2, 2, 32, 32), (2, 3, 64, 64), (2, 3, 32, 16), (3, 32, 32),
                                   (2, 1, 3, 32, 32)])
def test_bad_input_shape_raises(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="expected input"):
        _model()(torch.randn(*shape))


def test_sequence_mask() -> None:
    model = _model().eval()
    x = torch.randn(2, 3, 32, 32)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    changed = x.clone()
    changed[0, 1] = torch.randn(32, 32)
    changed[1, 2] = torch.randn(32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x, torch.ones(2, 3, dtype=torch.bool)))
        torch.testing.assert_close(model(x, mask), model(changed, mask))
        assert not torch.allclose(model(x), model(changed))
    with pytest.raises(ValueError, match="sequence"):
        model(x, torch.tensor([[False] * 3, [True] * 3]))
    with pytest.raises(ValueError, match="sequence_mask"):
        model(x, torch.ones(2, 3))


def test_absent_sequences_get_no_gradient_in_training() -> None:
    """Present rows' losses (main and aux) must not reach an absent sample's input channel."""
    model = _model().train()
    x = torch.randn(3, 3, 32, 32, requires_grad=True)
    mask = torch.tensor([[True, False, True], [True, True, True], [False, True, True]])
    out = model.forward_train(x, mask)
    loss = out.logits.square().mean()
    for i, aux in enumerate(out.aux_logits):
        loss = loss + aux[mask[:, i]].square().mean()
    loss.backward()
    absent = x.grad[~mask]
    present = x.grad[mask]
    assert torch.count_nonzero(absent) == 0
    assert bool(present.abs().amax(dim=(1, 2)).gt(0).all())


def test_load_google_npz_into_every_encoder(tmp_path: Path) -> None:
    config = _config()
    torch.manual_seed(123)
    source = TransUNetEncoder.from_config(config.backbone, in_channels=1)
    arrays = read_npz(write_google_npz(source, tmp_path / "tiny.npz"))
    expected = dict(source.named_parameters())
    for kwargs in ({}, {"share_encoder": True}):
        model = _model(**kwargs)
        reports = model.load_encoder_weights(arrays)
        assert len(reports) == len(model.unique_encoders())
        for seq in SEQS:
            for name, param in model.encoders[seq].named_parameters():
                torch.testing.assert_close(param, expected[name], msg=f"{seq}: {name}")
    single = _model()
    load_google_npz(single.encoders["LGE"], arrays)
    torch.testing.assert_close(single.encoders["LGE"].vit.embeddings.position_embeddings,
                               expected["vit.embeddings.position_embeddings"])


@pytest.mark.parametrize("use_priors", [True, False])
def test_state_dict_round_trip(use_priors: bool) -> None:
    model = _model(use_priors=use_priors, share_encoder=not use_priors).eval()
    buffer = io.BytesIO()
    torch.save({"config": model.config.to_dict(), "state": model.state_dict(),
                "name": model.name}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    config = IMMSegConfig.from_dict(json.loads(json.dumps(checkpoint["config"])))
    assert config == model.config
    rebuilt = IMMSeg.from_state_dict(config, checkpoint["state"], name=checkpoint["name"]).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))
    assert rebuilt.name == model.name


def test_config_validation() -> None:
    backbone = backbone_config("tiny", img_size=32, in_channels=3)
    with pytest.raises(ValueError, match="in_channels"):
        IMMSegConfig(backbone=backbone)
    for bad in ((), ("LGE", "LGE"), ("a.b",), ("",), ("keys",), "LGE"):
        with pytest.raises(ValueError, match="sequence"):
            _config(sequences=bad)
    for field_name in ("prior_dim", "embed_dim", "aux_channels", "dynamic_hidden"):
        with pytest.raises(ValueError, match=field_name):
            _config(**{field_name: 0})
    with pytest.raises(ValueError, match="share_encoder"):
        _config(share_encoder=1)
    with pytest.raises(ValueError, match="unknown"):
        IMMSegConfig.from_dict({**_config().to_dict(), "extra": 1})
    assert _config(sequences=["LGE", "T2w"]).sequences == ("LGE", "T2w")
    assert _config().num_classes == K
    with pytest.raises(ValueError, match="config"):
        IMMSeg(_config().backbone, *_priors())  # type: ignore[arg-type]


def test_the_release_pixel_exchange_at_any_size_and_through_a_checkpoint_record():
    """cross_attention="pixel": the release's N x N exchange, at bottlenecks the release's
    hard-wired 8 x 8 could not take, rebuilt from its record with the same outputs."""
    from networks.variants import network_from_record, network_record

    for size in (32, 48):
        model = _model(size, cross_attention="pixel").eval()
        x = torch.randn(2, 3, size, size)
        assert model(x).shape == (2, K, size, size)
    record = network_record(model)
    assert record["config"]["cross_attention"] == "pixel"
    rebuilt = network_from_record(network_record(model), model.state_dict()).eval()
    torch.testing.assert_close(rebuilt(x), model(x))
    with pytest.raises(ValueError, match="cross_attention"):
        _config(cross_attention="global")
