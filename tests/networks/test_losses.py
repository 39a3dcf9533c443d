"""Known-value tests for DiceLoss and SegmentationLoss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from networks.losses import DiceLoss, SegmentationLoss

S = 1e-5  # DiceLoss default smooth

# 4x4 labels with class counts 8 / 4 / 2 / 2 (background, myocardium, scar, edema).
COARSE = torch.tensor([[0, 0, 1, 1],
                       [0, 0, 1, 1],
                       [2, 2, 3, 3],
                       [0, 0, 0, 0]])[None]


def _uniform_dice_loss(counts: list[int], include_background: bool = True) -> float:
    """Soft Dice loss of a uniform prediction, by hand: Dice_c = (2 n_c / C) / (N / C + n_c)."""
    c, n = len(counts), sum(counts)
    per_class = [(2 * k / c + S) / (n / c + k + S) for k in counts]
    if not include_background:
        per_class = per_class[1:]
    return 1 - sum(per_class) / len(per_class)


def _perfect_logits(target: torch.Tensor, num_classes: int = 4) -> torch.Tensor:
    return 50.0 * F.one_hot(target, num_classes).movedim(-1, 1).float()


def test_dice_loss_is_zero_for_a_perfect_prediction() -> None:
    loss = DiceLoss(4)(_perfect_logits(COARSE), COARSE)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_dice_loss_of_a_uniform_prediction() -> None:
    logits = torch.zeros(1, 4, 4, 4)
    # Hand values: background (4)/(12), myocardium 2/8, scar and edema 1/6 each.
    expected = 1 - (4 / 12 + 2 / 8 + 1 / 6 + 1 / 6) / 4
    assert _uniform_dice_loss([8, 4, 2, 2]) == pytest.approx(expected, abs=1e-5)
    assert DiceLoss(4)(logits, COARSE).item() == pytest.approx(_uniform_dice_loss([8, 4, 2, 2]))
    no_bg = DiceLoss(4, include_background=False)(logits, COARSE).item()
    assert no_bg == pytest.approx(_uniform_dice_loss([8, 4, 2, 2], include_background=False))
    assert no_bg == pytest.approx(1 - (2 / 8 + 1 / 6 + 1 / 6) / 3, abs=1e-5)


def test_dice_loss_has_gradients() -> None:
    logits = torch.zeros(1, 4, 4, 4, requires_grad=True)
    DiceLoss(4)(logits, COARSE).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


def test_dice_loss_rejects_bad_arguments_and_shapes() -> None:
    with pytest.raises(ValueError):
        DiceLoss(1)
    with pytest.raises(ValueError):
        DiceLoss(4, smooth=0.0)
    with pytest.raises(ValueError):
        DiceLoss(4, smooth=float("nan"))
    loss = DiceLoss(4)
    with pytest.raises(ValueError, match=r"\(1, 4, 5\)"):
        loss(torch.zeros(1, 4, 4, 4), torch.zeros(1, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="channels"):
        loss(torch.zeros(1, 3, 4, 4), COARSE)
    with pytest.raises(ValueError, match="integer"):
        loss(torch.zeros(1, 4, 4, 4), COARSE.float())
    with pytest.raises(ValueError, match="labels span"):
        loss(torch.zeros(1, 4, 4, 4), COARSE + 1)


def test_segmentation_loss_default_mix_on_uniform_logits() -> None:
    total, parts = SegmentationLoss(4)(torch.zeros(1, 4, 4, 4), COARSE)
    # CE of a uniform prediction over C classes is ln C.
    ce, dice_value = math.log(4), _uniform_dice_loss([8, 4, 2, 2])
    assert parts["ce"] == pytest.approx(ce)
    assert parts["dice"] == pytest.approx(dice_value)
    assert total.item() == pytest.approx(0.2 * ce + 0.8 * dice_value)
    assert parts["total"] == pytest.approx(total.item())


def test_segmentation_loss_class_weights() -> None:
    # Voxel 1: class 0, logits (0, 0) -> p = 1/2. Voxel 2: class 1, logits (0, ln 3) -> p = 3/4.
    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]]).T.reshape(1, 2, 1, 2)
    target = torch.tensor([[[0, 1]]])
    plain, _ = SegmentationLoss(2, ce_weight=1.0, dice_weight=0.0)(logits, target)
    assert plain.item() == pytest.approx((math.log(2) + math.log(4 / 3)) / 2)
    weighted, _ = SegmentationLoss(2, ce_weight=1.0, dice_weight=0.0,
                                   class_weights=[1.0, 3.0])(logits, target)
    assert weighted.item() == pytest.approx((math.log(2) + 3 * math.log(4 / 3)) / 4)
    doubled, _ = SegmentationLoss(2, ce_weight=2.0, dice_weight=0.0)(logits, target)
    assert doubled.item() == pytest.approx(2 * plain.item())


def test_segmentation_statistics_are_additive_and_rows_select_samples() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 4, 6, 6, generator=generator)
    target = torch.randint(0, 4, (4, 6, 6), generator=generator)
    loss = SegmentationLoss(4, class_weights=[0.5, 1.0, 3.0, 2.0])
    whole, _ = loss(logits, target)
    halves = loss.statistics(logits[:2], target[:2]) + loss.statistics(logits[2:], target[2:])
    torch.testing.assert_close(loss.from_statistics(halves)[0], whole)
    rows = torch.tensor([True, False, True, False])
    kept, _ = loss(logits[rows], target[rows])
    torch.testing.assert_close(loss.from_statistics(loss.statistics(logits, target, rows))[0],
                               kept)
    with pytest.raises(ValueError, match="rows must be a bool tensor"):
        loss.statistics(logits, target, rows[:3])


def test_segmentation_loss_rejects_bad_arguments() -> None:
    for kwargs in ({"ce_weight": -0.1}, {"ce_weight": 0.0, "dice_weight": 0.0},
                   {"dice_weight": float("inf")}, {"class_weights": [1.0, 1.0]},
                   {"class_weights": [1.0, -1.0, 1.0, 1.0]}, {"class_weights": [0.0] * 4}):
        with pytest.raises(ValueError):
            SegmentationLoss(4, **kwargs)
    with pytest.raises(ValueError, match="do not match"):
        SegmentationLoss(4)(torch.zeros(2, 4, 4, 4), COARSE)


def test_segmentation_loss_raises_on_non_finite() -> None:
    logits = torch.zeros(1, 4, 4, 4)
    logits[0, 1, 2, 2] = float("nan")
    with pytest.raises(FloatingPointError, match="ce"):
        SegmentationLoss(4)(logits, COARSE)


