from __future__ import annotations

import pytest
import torch

from networks.prior_attention import (
    CrossModalFeatureEnhancement,
    CrossSequenceAttention,
    PriorGuidedAttention,
    check_sequence_mask,
    presence_weights,
)

C, P, E, S = 16, 12, 8, 3


def _cmfe(shared: bool = False) -> CrossModalFeatureEnhancement:
    torch.manual_seed(0)
    return CrossModalFeatureEnhancement(C, S, P, E, num_heads=4, shared=shared).eval()


@pytest.mark.parametrize("size", [(1, 1), (2, 2), (5, 7), (8, 8)])
def test_prior_guided_attention_any_size(size: tuple[int, int]) -> None:
    block = PriorGuidedAttention(C, P, E)
    f = torch.randn(2, C, *size)
    out_shared = block(f, torch.randn(P))
    out_per_sample = block(f, torch.randn(2, P))
    assert out_shared.shape == out_per_sample.shape == f.shape


def test_prior_guided_attention_depends_on_prior() -> None:
    torch.manual_seed(0)
    block = PriorGuidedAttention(C, P, E)
    f = torch.randn(2, C, 4, 4)
    assert not torch.allclose(block(f, torch.randn(P)), block(f, torch.randn(P)))


@pytest.mark.parametrize("prior_shape", [(P + 1,), (2, 3, P), (P, 1)])
def test_prior_guided_attention_bad_prior(prior_shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="prior"):
        PriorGuidedAttention(C, P, E)(torch.randn(2, C, 4, 4), torch.randn(*prior_shape))


@pytest.mark.parametrize("kwargs", [{"channels": 0}, {"prior_dim": -1}, {"embed_dim": 2.0},
                                    {"embed_dim": True}])
def test_prior_guided_attention_bad_constructor(kwargs: dict) -> None:
    args = {"channels": C, "prior_dim": P, "embed_dim": E, **kwargs}
    with pytest.raises(ValueError):
        PriorGuidedAttention(**args)


def test_cross_sequence_attention_masked_keys_are_ignored() -> None:
    torch.manual_seed(0)
    attention = CrossSequenceAttention(C, S, num_heads=4)
    features = torch.randn(2, S, C, 3, 3)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    changed = features.clone()
    changed[0, 1] = torch.randn(C, 3, 3)  # only the absent sequence of sample 0
    a, b = attention(features, mask), attention(changed, mask)
    assert a.shape == features.shape
    torch.testing.assert_close(a[0, [0, 2]], b[0, [0, 2]])
    torch.testing.assert_close(a[1], b[1])
    assert not torch.allclose(attention(features)[0, 0], attention(changed)[0, 0])


def test_cross_sequence_attention_knows_token_identity() -> None:
    torch.manual_seed(0)
    attention = CrossSequenceAttention(C, S, num_heads=4)
    with torch.no_grad():
        attention.sequence_embedding.normal_()
    features = torch.randn(1, S, C, 2, 2)
    order = [2, 0, 1]
    # Without the sequence embedding, attention would be permutation-equivariant.
    assert not torch.allclose(attention(features[:, order]), attention(features)[:, order])


def test_cross_sequence_attention_heads_must_divide() -> None:
    with pytest.raises(ValueError, match="num_heads"):
        CrossSequenceAttention(C, S, num_heads=5)


@pytest.mark.parametrize("size", [(1, 1), (2, 2), (4, 6)])
def test_cmfe_shapes(size: tuple[int, int]) -> None:
    cmfe = _cmfe().train()
    features = [torch.randn(2, C, *size) for _ in range(S)]
    enhanced, fused = cmfe(features, torch.randn(S, P))
    assert len(enhanced) == S
    assert all(e.shape == (2, C, *size) for e in enhanced)
    assert fused.shape == (2, C, *size)


def test_cmfe_full_mask_equals_no_mask() -> None:
    cmfe = _cmfe()
    features = [torch.randn(2, C, 3, 3) for _ in range(S)]
    priors = torch.randn(S, P)
    _, fused = cmfe(features, priors)
    _, masked = cmfe(features, priors, torch.ones(2, S, dtype=torch.bool))
    torch.testing.assert_close(fused, masked)


def test_cmfe_absent_sequence_does_not_reach_fusion() -> None:
    cmfe = _cmfe()
    features = [torch.randn(2, C, 3, 3) for _ in range(S)]
    priors = torch.randn(S, P)
    mask = torch.tensor([[True, True, False], [False, True, True]])
    other = [f.clone() for f in features]
    other[2][0] = torch.randn(C, 3, 3)
    other[0][1] = torch.randn(C, 3, 3)
    _, fused = cmfe(features, priors, mask)
    _, fused_other = cmfe(other, priors, mask)
    torch.testing.assert_close(fused, fused_other)


def test_cmfe_shared_has_one_prior_block() -> None:
    shared, separate = _cmfe(shared=True), _cmfe(shared=False)
    assert len({id(m) for m in shared.prior_attention}) == 1
    assert len({id(m) for m in separate.prior_attention}) == S
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(shared) < count(separate)


def test_cmfe_bad_inputs() -> None:
    cmfe = _cmfe()
    features = [torch.randn(2, C, 3, 3) for _ in range(S)]
    with pytest.raises(ValueError, match="feature maps"):
        cmfe(features[:2], torch.randn(S, P))
    with pytest.raises(ValueError, match="feature maps"):
        cmfe([*features[:2], torch.randn(2, C, 4, 4)], torch.randn(S, P))
    with pytest.raises(ValueError, match="priors"):
        cmfe(features, torch.randn(S + 1, P))
    with pytest.raises(ValueError, match="sequence"):
        cmfe(features, torch.randn(S, P), torch.tensor([[True, False, False], [False] * 3]))


def test_check_sequence_mask() -> None:
    assert check_sequence_mask(None, 2, 3) is None
    with pytest.raises(ValueError, match="bool"):
        check_sequence_mask(torch.ones(2, 3), 2, 3)
    with pytest.raises(ValueError, match=r"\[2, 3\]"):
        check_sequence_mask(torch.ones(2, 2, dtype=torch.bool), 2, 3)


def test_presence_weights_keep_scale() -> None:
    mask = torch.tensor([[True, True, True], [True, False, False], [False, True, True]])
    weights = presence_weights(mask, 3)
    torch.testing.assert_close(weights, torch.tensor([[1.0, 1, 1], [3, 0, 0], [0, 1.5, 1.5]]))
    torch.testing.assert_close(weights.sum(dim=1), torch.full((3,), 3.0))


def test_pixel_pair_attention_by_hand():
    """The release's exchange: softmax over the partner's pixels of |cos|, values from the query
    sequence itself (as released) or from the partner."""
    from networks.prior_attention import PixelPairAttention

    torch.manual_seed(0)
    features = torch.randn(2, 3, 4, 2, 3)  # B, S, C, h, w: N = 6 pixels
    for values in ("own", "partner"):
        module = PixelPairAttention(4, 3, values).eval()
        got = module(features)
        flat = features.flatten(3)
        for b in range(2):
            for m in range(3):
                parts = [features[b, m]]
                for p in (q for q in range(3) if q != m):
                    weights = torch.empty(6, 6)
                    for i in range(6):
                        for j in range(6):
                            a, c = flat[b, m, :, i], flat[b, p, :, j]
                            weights[i, j] = abs(float(a @ c) / float(a.norm() * c.norm()))
                    weights = torch.softmax(weights, dim=1)
                    source = flat[b, m] if values == "own" else flat[b, p]
                    parts.append((source @ weights.T).reshape(4, 2, 3))
                expected = module.mix[m](torch.cat(parts)[None])[0]
                torch.testing.assert_close(got[b, m], expected, atol=1e-5, rtol=1e-5)
    # An absent partner contributes zeros; any bottleneck size works.
    module = PixelPairAttention(4, 3).eval()
    mask = torch.tensor([[True, False, True], [True, True, True]])
    alone = module(features, mask)
    flat0 = features[0].flatten(2)
    weights = PixelPairAttention.attention(flat0[0][None], flat0[2][None])[0]
    enhanced = (flat0[0] @ weights.T).reshape(4, 2, 3)
    expected = module.mix[0](torch.cat([features[0, 0], torch.zeros(4, 2, 3), enhanced])[None])
    torch.testing.assert_close(alone[0, 0], expected[0], atol=1e-5, rtol=1e-5)
    assert module(torch.randn(1, 3, 4, 5, 7)).shape == (1, 3, 4, 5, 7)
    with pytest.raises(ValueError, match="values"):
        PixelPairAttention(4, 3, "mean")
