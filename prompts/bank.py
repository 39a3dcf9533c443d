"""Prior bank: text embeddings keyed by prompt name, with the model and texts they came from.

The released I_MMSeg code saved its modality embeddings as rows LGE, bSSFP, T2w but read row 0 as
bSSFP, so every sequence met another sequence's prior. Here a row is only ever fetched by its name
(``matrix(["modality/bSSFP", ...])``), and the file records which model and which texts (by hash)
produced it, so a stale or mismatched bank is caught at load time instead of silently used.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F

from datasets.labels import CLASS_NAMES, MODALITIES
from prompts.texts import canonical_names, class_key, modality_key
from utils import atomic_path, load_torch_file

FORMAT_VERSION = 1
#: ``text_hash`` of a bank whose texts are not known (e.g. the released tensors).
UNKNOWN_TEXT_HASH = "unknown"
#: Rows whose norm differs from 1 by more than this are not "normalized".
NORM_TOLERANCE = 1e-4

#: Row order of the released ``biomedclip_modality_prompts.pth`` ([3, 512]).
RELEASED_MODALITY_ORDER: tuple[str, ...] = ("LGE", "bSSFP", "T2w")
#: Row order of the released ``biomedclip_class_prompts.pth`` ([4, 512]).
RELEASED_CLASS_ORDER: tuple[str, ...] = ("background", "myocardium", "scar", "edema")
RELEASED_MODALITY_FILE = "biomedclip_modality_prompts.pth"
RELEASED_CLASS_FILE = "biomedclip_class_prompts.pth"
#: Names of the modality and class files: the release's text_features/ and our fixtures'.
RELEASED_FILES = (("embedding_MRI_information.pth", RELEASED_MODALITY_FILE),
                  ("embedding_class_information.pth", RELEASED_CLASS_FILE))
RELEASED_MODEL_ID = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"

_HASH_PATTERN = re.compile(r"[0-9a-f]{64}")
_PAYLOAD_KEYS = {"format_version", "model_id", "text_hash", "normalized", "texts", "embeddings"}


@dataclass(frozen=True, eq=False)
class PriorBank:
    """Named 1-D float32 embeddings of one text model.

    ``normalized`` states that every row has unit L2 norm (the CLIP convention, so dot products
    are cosine similarities); it is checked, not trusted. ``texts`` optionally keeps the encoded
    wording for inspection.
    """

    model_id: str
    text_hash: str
    embeddings: Mapping[str, torch.Tensor]
    normalized: bool = True
    texts: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model_id, str) or not self.model_id:
            raise ValueError(f"model_id must be a non-empty string, got {self.model_id!r}")
        if self.text_hash != UNKNOWN_TEXT_HASH and not (
                isinstance(self.text_hash, str) and _HASH_PATTERN.fullmatch(self.text_hash)):
            raise ValueError(f"text_hash must be a sha256 hex digest or {UNKNOWN_TEXT_HASH!r}, "
                             f"got {self.text_hash!r}")
        if not isinstance(self.embeddings, Mapping) or not self.embeddings:
            raise ValueError("embeddings must be a non-empty mapping name -> tensor")
        rows: dict[str, torch.Tensor] = {}
        dims: dict[str, int] = {}
        for name, row in self.embeddings.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"embedding names must be non-empty strings, got {name!r}")
            if not isinstance(row, torch.Tensor) or row.ndim != 1 or row.numel() == 0:
                raise ValueError(f"embedding {name!r} must be a non-empty 1-D tensor, got "
                                 f"{_describe(row)}")
            if not row.is_floating_point():
                raise ValueError(f"embedding {name!r} must be floating point, got {row.dtype}")
            row = row.detach().to(device="cpu", dtype=torch.float32).contiguous()
            if not torch.isfinite(row).all():
                raise ValueError(f"embedding {name!r} holds non-finite values")
            if self.normalized and not math.isclose(row.norm().item(), 1.0,
                                                    abs_tol=NORM_TOLERANCE):
                raise ValueError(f"embedding {name!r} has L2 norm {row.norm().item():.6f} but "
                                 "the bank is marked normalized")
            rows[name], dims[name] = row, row.numel()
        if len(set(dims.values())) > 1:
            raise ValueError(f"embedding dimensions differ: {dims}")
        object.__setattr__(self, "embeddings", MappingProxyType(rows))
        if self.texts is not None:
            if not isinstance(self.texts, Mapping) or set(self.texts) != set(rows):
                raise ValueError("texts, when given, must name exactly the embeddings")
            object.__setattr__(self, "texts", MappingProxyType(dict(self.texts)))

    @property
    def dim(self) -> int:
        return next(iter(self.embeddings.values())).numel()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.embeddings)

    def matrix(self, names: Sequence[str]) -> torch.Tensor:
        """Rows for ``names`` stacked in the order asked for, ``[len(names), dim]``."""
        if isinstance(names, str):
            raise ValueError(f"names must be a sequence of names, not the string {names!r}")
        names = list(names)
        if not names:
            raise ValueError("names must not be empty")
        missing = [name for name in names if name not in self.embeddings]
        if missing:
            raise ValueError(f"prior bank ({self.model_id}) has no embeddings {missing}; "
                             f"it holds {list(self.names)}")
        return torch.stack([self.embeddings[name] for name in names])

    def modality_matrix(self, sequences: Sequence[str] = MODALITIES) -> torch.Tensor:
        """Intensity priors of ``sequences`` in that order (default: MODALITIES channel order)."""
        return self.matrix([modality_key(sequence) for sequence in sequences])

    def class_matrix(self, classes: Sequence[str] = CLASS_NAMES) -> torch.Tensor:
        """Class prompts of ``classes`` in that order (default: label order 0..3)."""
        return self.matrix([class_key(label) for label in classes])


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def random_prior_bank(dim: int = 512, seed: int = 0,
                      model_id: str = "random") -> PriorBank:
    """Seeded random unit rows under every canonical prior name (default: BiomedCLIP's width).

    For timing and plumbing, where a model needs the shapes of a bank but not its meaning.
    """
    generator = torch.Generator().manual_seed(seed)
    names = canonical_names()
    rows = F.normalize(torch.randn(len(names), dim, generator=generator), dim=1)
    return PriorBank(model_id, "0" * 64, dict(zip(names, rows, strict=True)))


def save_prior_bank(bank: PriorBank, path: str | os.PathLike[str]) -> Path:
    """Write ``bank`` as a plain dict (loadable with ``weights_only=True``), atomically."""
    payload = {
        "format_version": FORMAT_VERSION,
        "model_id": bank.model_id,
        "text_hash": bank.text_hash,
        "normalized": bank.normalized,
        "texts": None if bank.texts is None else dict(bank.texts),
        "embeddings": {name: row.clone() for name, row in bank.embeddings.items()},
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_prior_bank(path: str | os.PathLike[str], *, required: Sequence[str] | None = None,
                    text_hash: str | None = None) -> PriorBank:
    """Read a bank written by ``save_prior_bank``; every error names the file.

    ``required`` lists names that must be present (e.g. the sequences a model consumes);
    ``text_hash`` (from ``PromptSet.text_hash``) demands the bank was encoded from those texts.
    """
    path = Path(path)
    payload = load_torch_file(path, "prior bank", unreadable="not a prior bank (cannot be read)",
                              missing="prior bank not found; create it with "
                                      f"`python -m prompts.encode --out {path}`")
    if not isinstance(payload, dict) or not set(payload) >= _PAYLOAD_KEYS:
        keys = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path}: not a prior bank (expected keys {sorted(_PAYLOAD_KEYS)}, "
                         f"found {keys})")
    if payload["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{path}: prior bank format {payload['format_version']!r} is not "
                         f"supported (expected {FORMAT_VERSION})")
    try:
        bank = PriorBank(model_id=payload["model_id"], text_hash=payload["text_hash"],
                         embeddings=payload["embeddings"], normalized=payload["normalized"],
                         texts=payload["texts"])
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error
    if required is not None:
        missing = [name for name in required if name not in bank.embeddings]
        if missing:
            raise ValueError(f"{path}: prior bank lacks {missing}; it holds {list(bank.names)}")
    if text_hash is not None and bank.text_hash != text_hash:
        raise ValueError(f"{path}: prior bank was encoded from other texts (text hash "
                         f"{bank.text_hash[:12]} != {text_hash[:12]}); re-run "
                         "`python -m prompts.encode` for the current prompt file")
    return bank


def bank_from_released_tensors(modality: torch.Tensor, classes: torch.Tensor, *,
                               model_id: str = RELEASED_MODEL_ID,
                               normalize: bool = True,
                               order: tuple[str, ...] = RELEASED_MODALITY_ORDER) -> PriorBank:
    """Key the released I_MMSeg tensors by name.

    ``modality`` is ``[3, D]`` with rows named by ``order`` (default RELEASED_MODALITY_ORDER:
    LGE, bSSFP, T2w, not the MODALITIES channel order); ``classes`` is ``[4, D]`` in
    RELEASED_CLASS_ORDER. The released rows are not unit length (norms around 3.6-5.4);
    ``normalize`` L2-normalises them so they are interchangeable with banks from
    ``prompts.encode``, ``normalize=False`` keeps them raw. Their texts are unknown, hence
    ``text_hash`` is UNKNOWN_TEXT_HASH.
    """
    blocks = ((modality, order, modality_key, "modality"),
              (classes, RELEASED_CLASS_ORDER, class_key, "classes"))
    embeddings: dict[str, torch.Tensor] = {}
    for tensor, order, key, what in blocks:
        if not isinstance(tensor, torch.Tensor) or tensor.ndim != 2 or tensor.shape[0] != len(
                order):
            raise ValueError(f"{what} must be a [{len(order)}, D] tensor (rows {list(order)}), "
                             f"got {_describe(tensor)}")
        rows = tensor.detach().to(device="cpu", dtype=torch.float32)
        if normalize:
            rows = F.normalize(rows, dim=-1)
        embeddings.update({key(name): row for name, row in zip(order, rows, strict=True)})
    return PriorBank(model_id=model_id, text_hash=UNKNOWN_TEXT_HASH, embeddings=embeddings,
                     normalized=normalize)


def load_released_priors(directory: str | os.PathLike[str], *, normalize: bool = True,
                         model_id: str = RELEASED_MODEL_ID,
                         order: Sequence[str] = RELEASED_MODALITY_ORDER) -> PriorBank:
    """Load the released modality and class tensors from ``directory``.

    Their files are named as in the release's ``text_features/`` folder
    (``embedding_MRI_information.pth``, ``embedding_class_information.pth``) or as our fixtures
    (``biomedclip_{modality,class}_prompts.pth``). ``order`` names the modality rows: by default
    the order their texts were probably encoded in (LGE, bSSFP, T2w); ``MODALITIES`` keys them
    as the released network indexes them (row 0 feeds bSSFP), which is how the authors' weights
    were trained, whatever text each row holds.
    """
    directory = Path(directory)
    tensors: list[torch.Tensor] = []
    for names in RELEASED_FILES:
        path = next((directory / name for name in names if (directory / name).is_file()),
                    directory / names[-1])
        tensor = load_torch_file(path, "released prior tensor",
                                 missing=f"released prior tensor not found (nor {names[0]})")
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{path}: expected a tensor, found {type(tensor).__name__}")
        tensors.append(tensor)
    try:
        return bank_from_released_tensors(*tensors, model_id=model_id, normalize=normalize,
                                          order=tuple(order))
    except ValueError as error:
        raise ValueError(f"{directory}: {error}") from error
