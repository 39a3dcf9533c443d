from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from networks.class_modulation import ClassFeatureModulation, DynamicHead, masked_mean

P, D, E, K = 24, 16, 12, 4


def _cfm() -> ClassFeatureModulation:
    torch.manual_seed(0)
    return ClassFeatureModulation(P, D, E)


def test_cfm_shapes() -> None:
    out = _cfm()(torch.randn(K, P), torch.randn(3, D), torch.randn(2, P))
    assert out.classes.shape == (3, K, E)
    assert out.context.shape == (3, E)


def test_cfm_starts_near_identity_and_depends_on_image() -> None:
    cfm = _cfm()
    classes = torch.randn(K, P)
    out = cfm(classes, torch.randn(2, D), torch.randn(3, P))
    plain = cfm.class_norm(cfm.class_proj(classes))
    # gamma and beta start small: modulated classes stay close to the projected text.
    assert (out.classes - plain).abs().max() < 0.5 * plain.abs().max()
    assert not torch.allclose(out.classes[0], out.classes[1])


def test_cfm_mask_averages_present_sequences_only() -> None:
    cfm = _cfm()
    classes, image, sequences = torch.randn(K, P), torch.randn(2, D), torch.randn(3, P)
    mask = torch.tensor([[True, False, True], [False, True, False]])
    masked = cfm(classes, image, sequences, mask).classes
    first = cfm(classes, image[:1], sequences[[0, 2]]).classes
    second = cfm(classes, image[1:], sequences[[1]]).classes
    torch.testing.assert_close(masked, torch.cat([first, second]))


def test_cfm_bad_shapes() -> None:
    cfm = _cfm()
    with pytest.raises(ValueError, match="class_priors"):
        cfm(torch.randn(K, P + 1), torch.randn(2, D), torch.randn(3, P))
    with pytest.raises(ValueError, match="image_features"):
        cfm(torch.randn(K, P), torch.randn(2, D, 1), torch.randn(3, P))
    with pytest.raises(ValueError, match="sequence_priors"):
        cfm(torch.randn(K, P), torch.randn(2, D), torch.randn(3))
    with pytest.raises(ValueError, match="sequence_mask"):
        cfm(torch.randn(K, P), torch.randn(2, D), torch.randn(3, P),
            torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError):
        ClassFeatureModulation(0, D, E)


def test_masked_mean() -> None:
    values = torch.arange(12.0).reshape(2, 3, 2)
    mask = torch.tensor([[True, False, True], [False, True, False]])
    torch.testing.assert_close(masked_mean(values, mask), torch.tensor([[2.0, 3.0], [8.0, 9.0]]))
    torch.testing.assert_close(masked_mean(values, None), values.mean(dim=1))


@pytest.mark.parametrize("size", [(1, 1), (5, 3), (32, 32)])
def test_dynamic_head_shapes(size: tuple[int, int]) -> None:
    head = DynamicHead(8, E, hidden=4)
    logits = head(torch.randn(2, 8, *size), torch.randn(2, K, E), torch.randn(2, E))
    assert logits.shape == (2, K, *size)


def test_dynamic_head_matches_explicit_two_layer_head() -> None:
    torch.manual_seed(0)
    c_in, m = 6, 3
    head = DynamicHead(c_in, E, hidden=m)
    features, classes, context = torch.randn(2, c_in, 4, 5), torch.randn(2, K, E), torch.randn(2, E)
    logits = head(features, classes, context)
    for b in range(2):
        for k in range(K):
            params = head.controller(head.norm(torch.cat([classes[b, k], context[b]])))
            w1, b1, w2, b2 = params.split((c_in * m, m, m, 1))
            hidden = F.relu(F.conv2d(features[b:b + 1], w1.view(c_in, m).T[:, :, None, None], b1))
            expected = F.conv2d(hidden, w2.view(1, m, 1, 1), b2)
            torch.testing.assert_close(logits[b, k], expected[0, 0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("c_in", [8, 16, 64])
def test_dynamic_head_initial_logit_scale(c_in: int) -> None:
    torch.manual_seed(0)
    head = DynamicHead(c_in, 256, hidden=8)
    # Decoder features come out of BN + ReLU.
    features = F.relu(torch.randn(4, c_in, 16, 16))
    classes, context = torch.randn(4, K, 256) * 0.02, torch.randn(4, 256) * 5.0
    std = head(features, classes, context).std().item()
    assert 0.1 < std < 3.0, std


def test_dynamic_head_bad_shapes() -> None:
    head = DynamicHead(8, E)
    features, classes, context = torch.randn(2, 8, 4, 4), torch.randn(2, K, E), torch.randn(2, E)
    with pytest.raises(ValueError, match="features"):
        head(torch.randn(2, 7, 4, 4), classes, context)
    with pytest.raises(ValueError, match="classes"):
        head(features, torch.randn(K, E), context)
    with pytest.raises(ValueError, match="context"):
        head(features, classes, torch.randn(3, E))
    with pytest.raises(ValueError, match="hidden"):
        DynamicHead(8, E, hidden=0)
