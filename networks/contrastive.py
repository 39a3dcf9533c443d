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


# --------------------------------------------------------------------------------------------
# The release's multi-scale supervised contrast (--contrastive release)

#: Classes each sequence's contrast leaves out in the released code: bSSFP shows no scar or edema
#: contrast, so its features are not asked to separate them; LGE and T2w leave out background.
RELEASE_IGNORED: dict[str, tuple[int, ...]] = {"bSSFP": (2, 3), "LGE": (0,), "T2w": (0,)}
#: Pixels drawn per class and image at H/2, H/4, H/8 (the release: [5, 2, 1] x 10).
RELEASE_VIEWS: tuple[int, ...] = (50, 20, 10)


def sample_class_pixels(embedding: Tensor, labels: Tensor, per_class: int,
                        ignore: tuple[int, ...] = (), rows: Tensor | None = None,
                        ) -> tuple[Tensor, Tensor]:
    """Up to ``per_class`` random pixels of every class present in each image.

    ``embedding [B, D, h, w]``; ``labels [B, H, W]`` are resized to ``h x w`` by nearest
    neighbour, as the release does; classes in ``ignore`` are never drawn; ``rows`` (bool
    ``[B]``) keeps only those images (a sequence's absent samples). Returns features ``[M, D]``
    and their classes ``[M]``. The draw uses torch's global generator (seeded by train.py and
    saved in resumable checkpoints).
    """
    if embedding.ndim != 4 or labels.ndim != 3 or labels.shape[0] != embedding.shape[0]:
        raise ValueError(f"need embedding [B, D, h, w] and labels [B, H, W], got "
                         f"{tuple(embedding.shape)} and {tuple(labels.shape)}")
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    small = F.interpolate(labels[:, None].float(), size=embedding.shape[-2:],
                          mode="nearest")[:, 0].long()
    features, classes = [], []
    for b in range(embedding.shape[0]):
        if rows is not None and not bool(rows[b]):
            continue
        flat_labels = small[b].flatten()
        flat = embedding[b].flatten(1)
        for c in torch.unique(flat_labels).tolist():
            if c in ignore:
                continue
            where = torch.nonzero(flat_labels == c).flatten()
            chosen = where[torch.randperm(len(where), device=where.device)[:per_class]]
            features.append(flat[:, chosen].T)
            classes.append(torch.full((len(chosen),), c, device=labels.device))
    if not features:
        return embedding.new_zeros(0, embedding.shape[1]), labels.new_zeros(0, dtype=torch.long)
    return torch.cat(features), torch.cat(classes)


def supervised_contrast(features: Tensor, classes: Tensor, temperature: float = 0.07) -> Tensor:
    """The release's supervised contrastive loss over anchors ``features [N, D]`` of ``classes
    [N]`` (pixels and text rows together), L2-normalised here.

    With ``s_ij = f_i . f_j / temperature`` (row maximum subtracted), a positive ``j`` of ``i``
    shares its class (``j != i``), and ``log p_ij = s_ij - log(exp(s_ij) + sum_{k negative}
    exp(s_ik))``. Each row averages ``log p`` over its positives (a row without one gives 0) and
    the loss is minus the mean over all rows. Positives do not compete with one another in the
    denominator, unlike SupCon's usual form.
    """
    if features.ndim != 2 or classes.shape != features.shape[:1]:
        raise ValueError(f"need features [N, D] and classes [N], got {tuple(features.shape)} "
                         f"and {tuple(classes.shape)}")
    require_finite(temperature=temperature, positive=True)
    anchors = F.normalize(features.float(), dim=1)
    logits = anchors @ anchors.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    same = classes[:, None] == classes[None, :]
    positive = same & ~torch.eye(len(classes), dtype=torch.bool, device=classes.device)
    negatives = torch.where(same, 0.0, logits.exp()).sum(dim=1, keepdim=True)
    log_prob = logits - torch.log(logits.exp() + negatives)
    per_row = torch.where(positive, log_prob, 0.0).sum(dim=1) / (positive.sum(dim=1) + 1e-5)
    return -per_row.mean()
