"""Training losses: soft multi-class Dice, weighted CE + Dice, and deep-supervision combination.

Every combined loss is checked finite before it is returned, so a diverging run stops at the first
bad step with the name of the offending component instead of writing NaN weights to a checkpoint.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from utils import require_finite

#: Floor of a denominator that can be zero (a class weighted 0 everywhere, an all-absent batch).
TINY = 1e-12


def _check_logits_target(logits: Tensor, target: Tensor, num_classes: int) -> None:
    """Logits [B, C, *spatial] against integer labels [B, *spatial] with values in 0..C-1."""
    if logits.ndim < 3 or target.ndim != logits.ndim - 1:
        raise ValueError(f"expected logits [B, C, *spatial] and target [B, *spatial], got "
                         f"logits {tuple(logits.shape)} and target {tuple(target.shape)}")
    if logits.shape[1] != num_classes:
        raise ValueError(f"logits {tuple(logits.shape)} have {logits.shape[1]} channels, "
                         f"expected {num_classes} classes")
    if logits.shape[0] != target.shape[0] or logits.shape[2:] != target.shape[1:]:
        raise ValueError(f"logits {tuple(logits.shape)} do not match target "
                         f"{tuple(target.shape)} in batch or spatial size")
    if target.dtype.is_floating_point or target.dtype == torch.bool or target.is_complex():
        raise ValueError(f"target must hold integer class labels, got dtype {target.dtype}")
    if target.device.type == "cpu":
        # On an accelerator this check would wait for the device at every step; the labels
        # there come from the processed-layout readers, which have refused anything outside
        # 0..3 already.
        low, high = int(target.min()), int(target.max())
        if low < 0 or high >= num_classes:
            raise ValueError(f"target labels span {low}..{high}, expected 0..{num_classes - 1}")


def _check_num_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")


def global_sum(tensor: Tensor) -> Tensor:
    """``tensor`` summed over the torch.distributed process group, gradients included.

    Identity outside distributed training. Under DDP every rank sees part of the global batch;
    summing the Dice statistics before the ratio makes each rank's loss the whole batch's Dice,
    and since the backward of the sum is again a sum, DDP's gradient averaging then yields the
    gradient a single process computes on the whole batch.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    from torch.distributed.nn.functional import all_reduce

    with warnings.catch_warnings():
        # Deprecated in favour of a private module; still the public autograd-aware collective.
        warnings.simplefilter("ignore", FutureWarning)
        return all_reduce(tensor, op=dist.ReduceOp.SUM)


class DiceLoss(nn.Module):
    """Soft Dice loss on softmax probabilities, averaged over classes.

    Intersections and sizes are summed over the whole batch before the ratio is taken, so a class
    missing from one slice (scar often is) does not turn that slice's term into noise; under
    torch.distributed the sums run over the global batch (:func:`global_sum`). ``smooth`` keeps a
    class absent from both prediction and target at Dice 1 rather than 0/0.
    """

    def __init__(self, num_classes: int, smooth: float = 1e-5,
                 include_background: bool = True) -> None:
        super().__init__()
        _check_num_classes(num_classes)
        require_finite(smooth=smooth, positive=True)
        if not isinstance(include_background, bool):
            raise ValueError(f"include_background must be a bool, got {include_background!r}")
        self.num_classes = num_classes
        self.smooth = float(smooth)
        self.include_background = include_background

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Return ``1 - mean_c Dice_c`` for logits [B, C, *spatial] and labels [B, *spatial]."""
        _check_logits_target(logits, target, self.num_classes)
        probs = torch.softmax(logits.float(), dim=1)
        one_hot = F.one_hot(target.long(), self.num_classes).movedim(-1, 1).to(probs.dtype)
        return self.from_statistics(global_sum(dice_statistics(probs, one_hot)))

    def from_statistics(self, statistics: Tensor) -> Tensor:
        """The loss from :func:`dice_statistics` sums ``[..., 2C]`` (leading dims are kept)."""
        intersection, sizes = statistics.split(self.num_classes, dim=-1)
        per_class = (2.0 * intersection + self.smooth) / (sizes + self.smooth)
        if not self.include_background:
            per_class = per_class[..., 1:]
        return 1.0 - per_class.mean(dim=-1)


def dice_statistics(probs: Tensor, one_hot: Tensor) -> Tensor:
    """Soft-Dice sums ``[2C]``: per class the intersection, then per class the two sizes added."""
    reduce_dims = [0, *range(2, probs.ndim)]
    return torch.cat([(probs * one_hot).sum(reduce_dims),
                      probs.sum(reduce_dims) + one_hot.sum(reduce_dims)])


def _check_finite(parts: dict[str, float]) -> None:
    bad = [name for name, value in parts.items() if not math.isfinite(value)]
    if bad:
        raise FloatingPointError(f"non-finite loss component(s) {bad}: {parts}")


class SegmentationLoss(nn.Module):
    """``ce_weight * CE + dice_weight * Dice``; defaults follow I_MMSeg's released 0.2 / 0.8.

    ``forward`` returns the scalar loss and a dict of floats (``ce``, ``dice``, ``total``) for
    logging; it raises FloatingPointError naming any non-finite component.
    """

    def __init__(self, num_classes: int, ce_weight: float = 0.2, dice_weight: float = 0.8,
                 class_weights: Sequence[float] | None = None) -> None:
        super().__init__()
        _check_num_classes(num_classes)
        require_finite(ce_weight=ce_weight, dice_weight=dice_weight)
        if ce_weight == 0 and dice_weight == 0:
            raise ValueError("ce_weight and dice_weight cannot both be 0")
        weight = None
        if class_weights is not None:
            values = [float(w) for w in class_weights]
            if len(values) != num_classes:
                raise ValueError(f"class_weights has {len(values)} entries for "
                                 f"{num_classes} classes")
            if not all(math.isfinite(w) and w >= 0 for w in values) or not any(values):
                raise ValueError(f"class_weights must be finite, >= 0 and not all 0: {values}")
            weight = torch.tensor(values, dtype=torch.float32)
        # A buffer follows the module across .to(device) and is saved with it.
        self.register_buffer("class_weights", weight)
        self.num_classes = num_classes
        self.ce_weight = float(ce_weight)
        self.dice_weight = float(dice_weight)
        self.dice = DiceLoss(num_classes)

    def forward(self, logits: Tensor, target: Tensor,
                rows: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        """The loss over the global batch, of the ``rows`` samples only when given (see
        :meth:`statistics`)."""
        total, ce, dice = self.from_statistics(global_sum(self.statistics(logits, target, rows)))
        # One host transfer gives both the finiteness check and the logged values.
        ce_value, dice_value, total_value = torch.stack([ce, dice, total]).detach().cpu().tolist()
        parts = {"ce": ce_value, "dice": dice_value, "total": total_value}
        _check_finite(parts)
        return total, parts

    def statistics(self, logits: Tensor, target: Tensor, rows: Tensor | None = None) -> Tensor:
        """This process's sums behind the loss, ``[2 + 2C]``.

        The class-weighted NLL and its weight mass, then :func:`dice_statistics`. ``rows`` (bool
        ``[B]``) keeps only those samples; the others enter every sum with weight zero, so all
        ranks run the same operations whatever they drop. Sums add across samples and ranks,
        which is what makes the loss of a global batch (``from_statistics(global_sum(...))``)
        exactly the single-process loss, class weights included.
        """
        _check_logits_target(logits, target, self.num_classes)
        logits, target = logits.float(), target.long()
        pixel_weight = (torch.ones_like(target, dtype=logits.dtype)
                        if self.class_weights is None else self.class_weights[target])
        nll = F.cross_entropy(logits, target, reduction="none")
        probs = torch.softmax(logits, dim=1)
        one_hot = F.one_hot(target, self.num_classes).movedim(-1, 1).to(probs.dtype)
        if rows is not None:
            if rows.shape != target.shape[:1] or rows.dtype != torch.bool:
                raise ValueError(f"rows must be a bool tensor of shape {tuple(target.shape[:1])}, "
                                 f"got {rows.dtype} {tuple(rows.shape)}")
            keep = rows.to(target.device).view(-1, *[1] * (target.ndim - 1))
            pixel_weight = torch.where(keep, pixel_weight, 0.0)
            probs = torch.where(keep[:, None], probs, 0.0)
            one_hot = torch.where(keep[:, None], one_hot, 0.0)
        ce_sums = torch.stack([torch.where(pixel_weight > 0, pixel_weight * nll, 0.0).sum(),
                               pixel_weight.sum()])
        return torch.cat([ce_sums, dice_statistics(probs, one_hot)])

    def from_statistics(self, statistics: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(total, ce, dice)`` from :meth:`statistics` sums ``[..., 2 + 2C]``."""
        ce = statistics[..., 0] / statistics[..., 1].clamp_min(TINY)
        dice = self.dice.from_statistics(statistics[..., 2:])
        return self.ce_weight * ce + self.dice_weight * dice, ce, dice
