"""Which sequences a sample has: one convention for sequence dropout, test.py and predict.py.

An absent sequence is always represented the same way, whatever the variant:

* its input channel is zero (the value a normalised slice never has everywhere), and
* networks that declare a ``sequence_mask`` capability (the I_MMSeg variants) also receive a
  ``[B, S]`` bool mask, True where the sequence is present, so that they can drop its branch
  instead of reading an empty image.

Early-fusion TransUNet only sees the zeroed channel; trained with sequence dropout it learns
what a zero channel means. Channel order is :data:`datasets.labels.MODALITIES`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from datasets.labels import MODALITIES
from networks.capabilities import capabilities_of


def parse_sequences(text: str | Iterable[str], known: Sequence[str] = MODALITIES
                    ) -> tuple[str, ...]:
    """``"LGE,T2w"`` (or an iterable of names) -> names in channel order; case-insensitive.

    Raises ValueError for unknown or repeated names and for an empty subset.
    """
    parts = [p.strip() for p in (text.split(",") if isinstance(text, str) else text)]
    parts = [p for p in parts if p]
    lookup = {name.lower(): name for name in known}
    unknown = [p for p in parts if p.lower() not in lookup]
    if unknown:
        raise ValueError(f"unknown sequence(s) {unknown}; known: {list(known)}")
    names = [lookup[p.lower()] for p in parts]
    if len(set(names)) != len(names):
        raise ValueError(f"sequence named twice in {parts}")
    if not names:
        raise ValueError("a sequence subset needs at least one sequence")
    return tuple(name for name in known if name in names)


def presence_vector(present: Sequence[str], known: Sequence[str] = MODALITIES) -> Tensor:
    """``[S]`` bool tensor, True for the sequences in ``present``."""
    names = parse_sequences(present, known)
    return torch.tensor([name in names for name in known], dtype=torch.bool)


def accepts_sequence_mask(model: nn.Module) -> bool:
    """Whether ``model`` declares that its ``forward`` takes a ``sequence_mask`` (I_MMSeg
    variants do; see :mod:`networks.capabilities`)."""
    return capabilities_of(model).sequence_mask


def zero_absent(images: Tensor, mask: Tensor) -> Tensor:
    """``images [B, S, H, W]`` with absent sequences (``mask [B, S]`` False) zeroed."""
    if mask.dtype != torch.bool or tuple(mask.shape) != tuple(images.shape[:2]):
        raise ValueError(f"mask must be a bool [{images.shape[0]}, {images.shape[1]}] tensor, got "
                         f"{mask.dtype} {tuple(mask.shape)}")
    return images * mask[:, :, None, None].to(images.dtype)


def forward_with_sequences(model: nn.Module, images: Tensor, mask: Tensor | None) -> Tensor:
    """Logits for ``images [B, S, H, W]`` with only the sequences marked in ``mask [B, S]``.

    ``mask=None`` means all present (the plain forward). Otherwise absent channels are zeroed and
    the mask is passed on to models that accept it.
    """
    if mask is None:
        return model(images)
    images = zero_absent(images, mask)
    if accepts_sequence_mask(model):
        return model(images, sequence_mask=mask)
    return model(images)


def check_model_inputs(model: nn.Module, present: Sequence[str]) -> None:
    """Refuse a single-sequence network whose one sequence is absent (it would read zeros)."""
    if capabilities_of(model).single_sequence and model.sequence not in present:
        raise ValueError(f"the model reads only {model.sequence}, which was not given "
                         f"(given: {', '.join(present)})")
