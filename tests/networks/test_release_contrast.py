"""The released code's multi-scale supervised contrast (contrastive="release")."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from networks.contrastive import (
    RELEASE_IGNORED,
    RELEASE_VIEWS,
    sample_class_pixels,
    supervised_contrast,
)
from networks.objective import ObjectiveConfig, TrainingObjective
from tests.networks.test_immseg import K, _model


def _by_hand(features: torch.Tensor, classes: list[int], temperature: float) -> float:
    """The release's formula, one anchor and one positive at a time."""
    f = F.normalize(features.double(), dim=1)
    n = len(classes)
    s = [[float(f[i] @ f[j]) / temperature for j in range(n)] for i in range(n)]
    rows = []
    for i in range(n):
        negatives = sum(math.exp(s[i][k]) for k in range(n) if classes[k] != classes[i])
        positives = [j for j in range(n) if j != i and classes[j] == classes[i]]
        total = sum(s[i][j] - math.log(math.exp(s[i][j]) + negatives) for j in positives)
        rows.append(total / (len(positives) + 1e-5))
    return -sum(rows) / n


def test_supervised_contrast_matches_the_formula_by_hand():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(7, 5, generator=generator)
    classes = [0, 0, 1, 2, 2, 2, 3]  # class 3 has no positive: its row gives 0
    got = supervised_contrast(features, torch.tensor(classes), temperature=0.5)
    assert float(got) == pytest.approx(_by_hand(features, classes, 0.5), rel=1e-5)
    # Scaling a feature changes nothing (normalised); aligned positives lower the loss.
    scaled = features.clone()
    scaled[0] *= 3
    assert float(supervised_contrast(scaled, torch.tensor(classes), 0.5)) == pytest.approx(
        float(got), rel=1e-5)
    aligned = features.clone()
    aligned[1] = aligned[0]
    assert float(supervised_contrast(aligned, torch.tensor(classes), 0.5)) < float(got)


def test_pixels_are_drawn_per_class_and_image_without_ignored_classes_or_absent_rows():
    labels = torch.zeros(3, 8, 8, dtype=torch.long)
    labels[:, :4] = 1
    labels[0, 0, 0] = 2
    labels[2, 6:, :] = 3
    embedding = torch.arange(3 * 2 * 8 * 8, dtype=torch.float32).reshape(3, 2, 8, 8)
    torch.manual_seed(0)
    pixels, classes = sample_class_pixels(embedding, labels, per_class=5, ignore=(0,),
                                          rows=torch.tensor([True, False, True]))
    # image 0: class 1 (5 of 31), class 2 (its 1 pixel); image 2: class 1 (5), class 3 (5)
    assert sorted(classes.tolist()) == [1] * 10 + [2] + [3] * 5
    # every drawn feature is a pixel of its class
    for feature, c in zip(pixels, classes, strict=True):
        image, rest = divmod(int(feature[0]), 2 * 64)
        assert image in (0, 2) and labels[image].flatten()[rest] == c
    # At a coarser map the labels are resized by nearest neighbour (every other pixel here), so
    # all of a class's 4 x 4 pixels are drawn when fewer than per_class exist.
    small, small_classes = sample_class_pixels(embedding[:, :, ::2, ::2], labels, per_class=50)
    expected = torch.cat([torch.bincount(labels[b, ::2, ::2].flatten(), minlength=4)
                          for b in range(3)]).reshape(3, 4).sum(dim=0)
    assert torch.equal(torch.bincount(small_classes, minlength=4), expected)
    assert small.shape == (len(small_classes), 2)


def test_the_release_contrast_trains_its_heads_from_the_raw_skips():
    model = _model(contrastive="release").train()
    x = torch.randn(2, 3, 32, 32)
    labels = torch.randint(0, K, (2, 32, 32))
    out = model.forward_train(x)
    assert [tuple(m.shape[1:]) for m in out.scale_embeddings[0]] == [(8, 16, 16), (16, 8, 8),
                                                                     (32, 4, 4)]
    assert [tuple(t.shape) for t in out.scale_texts] == [(K, 8), (K, 16), (K, 32)]
    assert out.ignored_classes == tuple(RELEASE_IGNORED[s] for s in model.config.sequences)
    objective = TrainingObjective(K, ObjectiveConfig(contrastive_start_epoch=0,
                                                     aux_weight=0.0, ce_weight=0.0,
                                                     dice_weight=1.0))
    loss, parts = objective(out, labels, epoch=0)
    assert math.isfinite(parts["contrastive"]) and parts["contrastive"] > 0
    loss.backward()
    heads = model.contrast_heads["bSSFP"][0][0].weight.grad
    assert heads is not None and heads.abs().sum() > 0
    assert model.contrast_texts[2][0].weight.grad.abs().sum() > 0
    # Ours has none of these modules, and its output no scale embeddings.
    ours = _model()
    assert not hasattr(ours, "contrast_heads") and ours.forward_train(x).scale_embeddings == ()
    assert RELEASE_VIEWS == (50, 20, 10)


def test_a_sequence_absent_from_the_batch_is_left_out_of_the_release_contrast():
    model = _model(contrastive="release").train()
    x, labels = torch.randn(2, 3, 32, 32), torch.randint(0, K, (2, 32, 32))
    mask = torch.tensor([[False, True, True], [False, True, False]])
    out = model.forward_train(x, mask)
    objective = TrainingObjective(K, ObjectiveConfig(contrastive_start_epoch=0))
    torch.manual_seed(1)
    with_mask = objective._release_contrast(out, labels, mask.T)
    # The same value from LGE and T2w alone, in the same order of draws.
    kept = out._replace(scale_embeddings=out.scale_embeddings[1:],
                        ignored_classes=out.ignored_classes[1:])
    torch.manual_seed(1)
    alone = objective._release_contrast(kept, labels, mask.T[1:])
    torch.testing.assert_close(with_mask, alone)
