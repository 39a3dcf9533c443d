"""Pixel-text contrastive loss: pull each pixel embedding towards its class's text embedding.

Pixel embeddings live at a reduced resolution (H/4 in I_MMSeg) while labels are full
resolution. Labels are reduced by AREA, not nearest neighbour: each low-resolution pixel gets the
fraction of every class inside its footprint and the cross-entropy uses those fractions as soft
targets. Nearest sampling keeps one label out of 16 and would randomly drop the 2-4 pixel thin
myocardium and small scar; majority voting would erase them systematically. Area fractions keep
every labelled pixel's contribution exactly (summed over the map, each full-resolution pixel
weighs 1/16 of a low-resolution one, whichever cell it falls in).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from networks.losses import TINY
from utils import require_finite


def downsample_labels(
    labels: Tensor, size: tuple[int, int], num_classes: int, ignore_index: int | None = None
) -> Tensor:
    """Class fractions ``[B, K, h, w]`` of integer ``labels`` [B, H, W] in each output cell.

    Pixels equal to ``ignore_index`` count for no class, so a cell's fractions sum to the share
    of its pixels that are labelled (0 for a fully ignored cell).
    """
    if labels.ndim != 3:
        raise ValueError(f"labels must be [B, H, W], got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"labels must hold integer class ids, got dtype {labels.dtype}")
    height, width = int(size[0]), int(size[1])
    if not (0 < height <= labels.shape[1] and 0 < width <= labels.shape[2]):
        raise ValueError(f"cannot reduce labels {tuple(labels.shape)} to {height}x{width}: the "
                         "embedding map must not be larger than the label map")
    labels = labels.long()
    valid = torch.ones_like(labels, dtype=torch.bool)
    if ignore_index is not None:
        valid = labels != ignore_index
    checked = labels[valid]
    if checked.numel() and (int(checked.min()) < 0 or int(checked.max()) >= num_classes):
        raise ValueError(f"labels span {int(checked.min())}..{int(checked.max())}, expected "
                         f"0..{num_classes - 1}" + (f" or {ignore_index}"
                                                     if ignore_index is not None else ""))
    one_hot = F.one_hot(labels.where(valid, 0), num_classes).movedim(-1, 1).float()
    one_hot = one_hot * valid[:, None].float()
    return F.adaptive_avg_pool2d(one_hot, (height, width))


class PixelTextContrastiveLoss(nn.Module):
    """Cross-entropy over classes of ``cos(pixel, class) / temperature`` at every pixel.

    ``forward(pixel_embeddings [B, E, h, w], class_embeddings [K, E] or [B, K, E], labels
    [B, H, W])`` returns ``(loss, {"contrastive": value})`` and raises FloatingPointError when the
    loss is not finite. With ``class_balanced`` each class present in the batch contributes
    equally (its pixel-mean loss), so the large background does not swamp scar and edema.
    """

    def __init__(
        self,
        temperature: float = 0.07,
        ignore_index: int | None = None,
        class_balanced: bool = False,
    ) -> None:
        super().__init__()
        require_finite(temperature=temperature, positive=True)
        if ignore_index is not None and (
            isinstance(ignore_index, bool) or not isinstance(ignore_index, int)
        ):
            raise ValueError(f"ignore_index must be an int or None, got {ignore_index!r}")
        if not isinstance(class_balanced, bool):
            raise ValueError(f"class_balanced must be a bool, got {class_balanced!r}")
        self.temperature = float(temperature)
        self.ignore_index = ignore_index
        self.class_balanced = class_balanced

    def logits(self, pixel_embeddings: Tensor, class_embeddings: Tensor) -> Tensor:
        """Cosine similarities over the temperature, [B, K, h, w]."""
        if pixel_embeddings.ndim != 4:
            raise ValueError(f"pixel_embeddings must be [B, E, h, w], got "
                             f"{tuple(pixel_embeddings.shape)}")
        batch, dim = pixel_embeddings.shape[:2]
        if class_embeddings.ndim == 2:
            class_embeddings = class_embeddings.expand(batch, -1, -1)
        if (class_embeddings.ndim != 3 or class_embeddings.shape[0] != batch
                or class_embeddings.shape[2] != dim):
            raise ValueError(f"class_embeddings must be [K, {dim}] or [{batch}, K, {dim}], got "
                             f"{tuple(class_embeddings.shape)}")
        pixels = F.normalize(pixel_embeddings.float(), dim=1)
        classes = F.normalize(class_embeddings.float(), dim=2)
        return torch.einsum("behw,bke->bkhw", pixels, classes) / self.temperature

    def forward(
        self, pixel_embeddings: Tensor, class_embeddings: Tensor, labels: Tensor
    ) -> tuple[Tensor, dict[str, float]]:
        logits = self.logits(pixel_embeddings, class_embeddings)
        if labels.ndim != 3 or labels.shape[0] != logits.shape[0]:
            raise ValueError(f"labels must be [{logits.shape[0]}, H, W], got "
                             f"{tuple(labels.shape)}")
        targets = downsample_labels(labels, tuple(logits.shape[2:]), logits.shape[1],
                                    self.ignore_index)
        loss = self.from_sums(self.sums(logits, targets))
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"non-finite contrastive loss: {value}")
        return loss, {"contrastive": value}

    def sums(self, logits: Tensor, targets: Tensor, rows: Tensor | None = None) -> Tensor:
        """This process's sums behind the loss, ``[2, K]``: per class the soft-target NLL
        ``-sum(q * log p)`` and the label mass ``sum(q)``.

        ``rows`` (bool ``[B]``) keeps only those samples; the others enter with weight zero, so
        every rank runs the same operations. Sums add across samples and ranks.
        """
        weighted = -(targets * F.log_softmax(logits, dim=1))
        if rows is not None:
            keep = rows.to(targets.device)[:, None, None, None]
            weighted = torch.where(keep, weighted, 0.0)
            targets = torch.where(keep, targets, 0.0)
        return torch.stack([weighted.sum(dim=(0, 2, 3)), targets.sum(dim=(0, 2, 3))])

    def from_sums(self, sums: Tensor) -> Tensor:
        """The loss from :meth:`sums` ``[..., 2, K]`` (leading dims are kept).

        Clamped denominators instead of branches: an all-ignored batch gives 0, no host sync.
        """
        weighted, mass = sums.unbind(-2)
        if self.class_balanced:
            per_class = weighted / mass.clamp_min(TINY)
            return per_class.sum(-1) / (mass > 0).sum(-1).clamp_min(1)
        return weighted.sum(-1) / mass.sum(-1).clamp_min(TINY)
