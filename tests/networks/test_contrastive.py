from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from networks.contrastive import PixelTextContrastiveLoss, downsample_labels


def test_one_pixel_two_classes_by_hand() -> None:
    pixel = torch.tensor([3.0, 4.0]).view(1, 2, 1, 1)  # unit direction (0.6, 0.8)
    classes = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # cosines 0.6 and 0.8
    labels = torch.zeros(1, 1, 1, dtype=torch.long)
    tau = 0.5
    loss, parts = PixelTextContrastiveLoss(temperature=tau)(pixel, classes, labels)
    expected = -0.6 / tau + math.log(math.exp(0.6 / tau) + math.exp(0.8 / tau))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert parts == {"contrastive": pytest.approx(expected, rel=1e-6)}


def test_aligned_embeddings_beat_shuffled() -> None:
    torch.manual_seed(0)
    classes = F.normalize(torch.randn(4, 16), dim=1)
    labels = torch.randint(0, 4, (2, 32, 32))
    low = labels[:, ::4, ::4]  # one class per cell after nearest reduction
    labels = low.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2)
    aligned = classes[low].permute(0, 3, 1, 2)  # [B, E, 8, 8]
    shuffled = classes[(low + 1) % 4].permute(0, 3, 1, 2)
    loss_fn = PixelTextContrastiveLoss()
    aligned_loss, _ = loss_fn(aligned, classes, labels)
    shuffled_loss, _ = loss_fn(shuffled, classes, labels)
    assert aligned_loss < shuffled_loss
    assert aligned_loss < 0.5


def test_shared_and_per_sample_class_embeddings_agree() -> None:
    torch.manual_seed(0)
    pixels, classes = torch.randn(2, 8, 4, 4), torch.randn(3, 8)
    labels = torch.randint(0, 3, (2, 16, 16))
    loss_fn = PixelTextContrastiveLoss()
    shared, _ = loss_fn(pixels, classes, labels)
    per_sample, _ = loss_fn(pixels, classes.expand(2, -1, -1), labels)
    torch.testing.assert_close(shared, per_sample)
    assert loss_fn.logits(pixels, classes).shape == (2, 3, 4, 4)


def test_downsample_labels_keeps_thin_structures() -> None:
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[:, :, 1] = 2  # a one-pixel-wide line
    fractions = downsample_labels(labels, (2, 2), num_classes=3)
    assert fractions.shape == (1, 3, 2, 2)
    torch.testing.assert_close(fractions.sum(dim=1), torch.ones(1, 2, 2))
    torch.testing.assert_close(fractions[0, 2], torch.tensor([[0.25, 0.0], [0.25, 0.0]]))


def test_downsample_labels_ignore_index() -> None:
    labels = torch.tensor([[[0, 255], [1, 255]]])
    fractions = downsample_labels(labels, (1, 1), num_classes=2, ignore_index=255)
    torch.testing.assert_close(fractions.flatten(), torch.tensor([0.25, 0.25]))


def test_soft_targets_equal_the_full_resolution_loss() -> None:
    # Constant embeddings per cell: soft-target CE equals the mean CE over full-res pixels.
    torch.manual_seed(0)
    pixels, classes = torch.randn(1, 6, 2, 2), torch.randn(3, 6)
    labels = torch.randint(0, 3, (1, 8, 8))
    loss_fn = PixelTextContrastiveLoss(temperature=0.2)
    loss, _ = loss_fn(pixels, classes, labels)
    upsampled = loss_fn.logits(pixels, classes).repeat_interleave(4, 2).repeat_interleave(4, 3)
    torch.testing.assert_close(loss, F.cross_entropy(upsampled, labels))


def test_ignored_pixels_do_not_count() -> None:
    torch.manual_seed(0)
    pixels, classes = torch.randn(1, 6, 4, 4), torch.randn(3, 6)
    labels = torch.randint(0, 3, (1, 4, 4))
    marked = labels.clone()
    marked[:, :2] = -1
    loss_fn = PixelTextContrastiveLoss(ignore_index=-1)
    loss, _ = loss_fn(pixels, classes, marked)
    expected = F.cross_entropy(loss_fn.logits(pixels, classes)[:, :, 2:], labels[:, 2:])
    torch.testing.assert_close(loss, expected)
    all_ignored, _ = loss_fn(pixels, classes, torch.full_like(labels, -1))
    assert all_ignored.item() == 0.0


def test_class_balanced_weights_classes_equally() -> None:
    pixels = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1).expand(1, 2, 1, 4).contiguous()
    classes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([[[0, 0, 0, 1]]])
    tau = 1.0
    loss, _ = PixelTextContrastiveLoss(temperature=tau, class_balanced=True)(pixels, classes,
                                                                             labels)
    lse = math.log(math.e + 1.0)
    expected = 0.5 * ((lse - 1.0) + (lse - 0.0))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_gradients_reach_both_sides() -> None:
    pixels = torch.randn(2, 8, 4, 4, requires_grad=True)
    classes = torch.randn(2, 4, 8, requires_grad=True)
    loss, _ = PixelTextContrastiveLoss()(pixels, classes, torch.randint(0, 4, (2, 16, 16)))
    loss.backward()
    assert pixels.grad.abs().sum() > 0 and classes.grad.abs().sum() > 0


def test_non_finite_raises() -> None:
    pixels = torch.full((1, 4, 2, 2), float("nan"))
    with pytest.raises(FloatingPointError):
        PixelTextContrastiveLoss()(pixels, torch.randn(2, 4), torch.zeros(1, 8, 8, dtype=int))


@pytest.mark.parametrize(
    ("pixels", "classes", "labels", "match"),
    [
        ((2, 8, 4, 4), (3, 8), (2, 1, 16, 16), "labels"),  # channel axis left in the labels
        ((2, 8, 4, 4), (3, 8), (1, 16, 16), "labels"),  # batch mismatch
        ((2, 8, 4, 4), (3, 7), (2, 16, 16), "class_embeddings"),
        ((2, 8, 4, 4), (3, 3, 8), (2, 16, 16), "class_embeddings"),
        ((2, 8, 4), (3, 8), (2, 16, 16), "pixel_embeddings"),
        ((2, 8, 32, 32), (3, 8), (2, 16, 16), "larger"),
    ],
)
def test_bad_shapes_raise(pixels, classes, labels, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PixelTextContrastiveLoss()(torch.randn(*pixels), torch.randn(*classes),
                                   torch.zeros(*labels, dtype=torch.long))


def test_bad_labels_raise() -> None:
    loss_fn = PixelTextContrastiveLoss()
    pixels, classes = torch.randn(1, 8, 2, 2), torch.randn(3, 8)
    with pytest.raises(ValueError, match="span"):
        loss_fn(pixels, classes, torch.full((1, 8, 8), 3))
    with pytest.raises(ValueError, match="integer"):
        loss_fn(pixels, classes, torch.zeros(1, 8, 8))


@pytest.mark.parametrize("kwargs", [{"temperature": 0.0}, {"temperature": float("inf")},
                                    {"temperature": True}, {"ignore_index": 1.5},
                                    {"class_balanced": 1}])
def test_bad_constructor(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        PixelTextContrastiveLoss(**kwargs)
