"""Training objective: composition by hand, contrastive schedule, absent sequences."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from networks.capabilities import Capabilities
from networks.contrastive import PixelTextContrastiveLoss
from networks.immseg import IMMSegOutput
from networks.losses import SegmentationLoss
from networks.objective import ObjectiveConfig, TrainingObjective, forward_outputs


def _outputs(seed: int = 0, batch: int = 2, size: int = 16) -> tuple[IMMSegOutput, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator)

    outputs = IMMSegOutput(
        logits=rand(batch, 4, size, size),
        aux_logits=tuple(rand(batch, 4, size // 4, size // 4) for _ in range(3)),
        pixel_embeddings=tuple(rand(batch, 8, size // 4, size // 4) for _ in range(3)),
        class_embeddings=rand(batch, 4, 8))
    labels = torch.randint(0, 4, (batch, size, size), generator=generator)
    return outputs, labels


def _terms(outputs: IMMSegOutput, labels: torch.Tensor, sequences: int = 3
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """By hand: the main loss, each sequence's auxiliary loss ``[S]`` (first ``sequences``) and
    the mean pixel-text term, with the released weights (0.2 CE + 0.8 Dice, tau 0.07)."""
    seg = SegmentationLoss(4, 0.2, 0.8)
    contrastive = PixelTextContrastiveLoss(0.07)
    main = seg(outputs.logits, labels)[0]
    aux = torch.stack([seg(F.interpolate(a, size=(16, 16), mode="bilinear"), labels)[0]
                       for a in outputs.aux_logits[:sequences]])
    pixel_text = torch.stack([contrastive(p, outputs.class_embeddings, labels)[0]
                              for p in outputs.pixel_embeddings]).mean()
    return main, aux, pixel_text


def test_total_is_the_documented_weighted_sum():
    outputs, labels = _outputs()
    config = ObjectiveConfig(aux_weight=0.4, contrastive_weight=0.1, contrastive_start_epoch=3)
    objective = TrainingObjective(4, config)
    main, per_sequence, pixel_text = _terms(outputs, labels)
    aux = per_sequence.mean()

    before, parts_before = objective(outputs, labels, epoch=2)
    torch.testing.assert_close(before, main + 0.4 * aux)
    assert "contrastive" not in parts_before

    after, parts = objective(outputs, labels, epoch=3)
    torch.testing.assert_close(after, main + 0.4 * aux + 0.1 * pixel_text)
    assert parts["total"] == pytest.approx(float(after))
    assert parts["contrastive"] == pytest.approx(float(pixel_text))
    assert objective.contrastive_weight(2) == 0.0 and objective.contrastive_weight(3) == 0.1


def test_plain_logits_get_the_segmentation_loss_only():
    outputs, labels = _outputs()
    loss, parts = TrainingObjective(4)(outputs.logits, labels, epoch=50)
    torch.testing.assert_close(loss, SegmentationLoss(4)(outputs.logits, labels)[0])
    assert set(parts) == {"seg", "ce", "dice", "total"}


def test_absent_sequences_do_not_count():
    outputs, labels = _outputs()
    objective = TrainingObjective(4, ObjectiveConfig(contrastive_start_epoch=0))
    mask = torch.tensor([[True, True, False], [True, False, False]])
    reference, _ = objective(outputs, labels, 0, mask)
    # Garbage in the absent slots (T2w everywhere, LGE in sample 1) changes nothing.
    aux = [a.clone() for a in outputs.aux_logits]
    pix = [p.clone() for p in outputs.pixel_embeddings]
    aux[2].fill_(50.0)
    pix[2].fill_(-3.0)
    aux[1][1].fill_(50.0)
    pix[1][1].fill_(7.0)
    changed = outputs._replace(aux_logits=tuple(aux), pixel_embeddings=tuple(pix))
    torch.testing.assert_close(objective(changed, labels, 0, mask)[0], reference)
    # ... while the same garbage in present slots does change it.
    assert not torch.allclose(objective(changed, labels, 0)[0], reference)
    with pytest.raises(ValueError, match="sequence_mask"):
        objective(outputs, labels, 0, mask.int())


@pytest.mark.parametrize("class_weights", [None, (0.5, 1.0, 3.0, 2.0)])
def test_absent_rows_give_the_loss_of_the_present_rows_alone(class_weights):
    """Known value: each sequence's terms equal the plain losses on its present samples only,
    and a sequence absent from the whole batch (T2w here) is left out of the mean."""
    outputs, labels = _outputs(seed=3, batch=4)
    config = ObjectiveConfig(contrastive_start_epoch=0, class_weights=class_weights)
    objective = TrainingObjective(4, config)
    mask = torch.tensor([[True, False, False], [True, True, False], [False, True, False],
                         [True, True, False]])
    seg = SegmentationLoss(4, 0.2, 0.8, class_weights)
    contrastive = PixelTextContrastiveLoss(0.07)
    aux, pixel_text = [], []
    for s in range(2):
        rows = mask[:, s]
        upsampled = F.interpolate(outputs.aux_logits[s][rows], size=(16, 16), mode="bilinear")
        aux.append(seg(upsampled, labels[rows])[0])
        pixel_text.append(contrastive(outputs.pixel_embeddings[s][rows],
                                      outputs.class_embeddings[rows], labels[rows])[0])
    expected = (seg(outputs.logits, labels)[0] + 0.4 * torch.stack(aux).mean()
                + 0.1 * torch.stack(pixel_text).mean())
    loss, parts = objective(outputs, labels, 0, mask)
    torch.testing.assert_close(loss, expected)
    assert parts["aux"] == pytest.approx(float(torch.stack(aux).mean()), rel=1e-5)
    assert parts["contrastive"] == pytest.approx(float(torch.stack(pixel_text).mean()), rel=1e-5)


def test_absent_sequences_stay_in_the_graph_with_zero_gradient():
    """Every rank must back-propagate through the same tensors (DDP), whatever it lacks."""
    outputs, labels = _outputs()
    leaves = IMMSegOutput(
        outputs.logits.requires_grad_(),
        tuple(a.clone().requires_grad_() for a in outputs.aux_logits),
        tuple(p.clone().requires_grad_() for p in outputs.pixel_embeddings),
        outputs.class_embeddings.requires_grad_())
    mask = torch.tensor([[True, True, False], [True, False, False]])
    loss, _ = TrainingObjective(4, ObjectiveConfig(contrastive_start_epoch=0))(
        leaves, labels, 0, mask)
    loss.backward()
    for tensors in (leaves.aux_logits, leaves.pixel_embeddings):
        assert all(t.grad is not None for t in tensors)
        assert not tensors[0].grad.eq(0).all()
        assert tensors[2].grad.eq(0).all()  # T2w absent everywhere
        assert tensors[1].grad[1].eq(0).all() and not tensors[1].grad[0].eq(0).all()
    with pytest.raises(ValueError, match="without any sequence"):
        TrainingObjective(4)(outputs, labels, 0, torch.tensor([[True] * 3, [False] * 3]))


def test_non_finite_outputs_raise_and_bad_settings_are_refused():
    outputs, labels = _outputs()
    nan = torch.full((2, 8, 4, 4), math.nan)
    broken = outputs._replace(pixel_embeddings=(nan, *outputs.pixel_embeddings[1:]))
    with pytest.raises(FloatingPointError):
        TrainingObjective(4, ObjectiveConfig(contrastive_start_epoch=0))(broken, labels, 0)
    for bad in ({"aux_weight": -1.0}, {"temperature": 0.0}, {"contrastive_start_epoch": -1},
                {"contrastive_weight": math.inf}):
        with pytest.raises(ValueError):
            ObjectiveConfig(**bad)


def test_forward_outputs_prefers_forward_train():
    class WithTrain(torch.nn.Module):
        capabilities = Capabilities(training_outputs=True)

        def forward(self, x):
            return "plain"

        def forward_train(self, x, mask=None):
            return "train"

    assert forward_outputs(WithTrain(), torch.zeros(1)) == "train"
    with pytest.raises(ValueError, match="sequence mask"):
        forward_outputs(torch.nn.Identity(), torch.zeros(1), torch.ones(1, 3, dtype=torch.bool))


def test_the_release_staged_schedule_by_hand():
    """The released code: the first third of the epochs trains the per-sequence branches alone
    (losses summed, contrastive 0.1), then main + 0.5 x sum + 0.05 x contrastive."""
    outputs, labels = _outputs(seed=3)
    main, per_sequence, pixel_text = _terms(outputs, labels)
    aux_sum = per_sequence.sum()
    objective = TrainingObjective(4, ObjectiveConfig(schedule="release_staged", max_epochs=30,
                                                     contrastive_start_epoch=5))
    # 30 epochs: the first stage is 0-based epochs 0..9 (0-99 of 300 scaled).
    torch.testing.assert_close(objective(outputs, labels, epoch=0)[0], aux_sum)
    torch.testing.assert_close(objective(outputs, labels, epoch=9)[0],
                               aux_sum + 0.1 * pixel_text)
    torch.testing.assert_close(objective(outputs, labels, epoch=10)[0],
                               main + 0.5 * aux_sum + 0.05 * pixel_text)
    assert [objective.weights(e).main for e in (0, 9, 10, 29)] == [0.0, 0.0, 1.0, 1.0]
    # A sequence absent from the whole batch drops out of the sum.
    mask = torch.tensor([[True, True, False], [True, True, False]])
    partial = _terms(outputs, labels, sequences=2)[1].sum()
    torch.testing.assert_close(objective(outputs, labels, epoch=0, sequence_mask=mask)[0],
                               partial)
    with pytest.raises(ValueError, match="schedule"):
        ObjectiveConfig(schedule="cosine")
    assert ObjectiveConfig().schedule == "constant"
