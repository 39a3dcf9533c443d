"""The prompt texts behind the prior bank: loading, validation and a stable content hash.

A prompt file (TOML) holds one intensity-prior text per sequence and one text per class. Texts are
addressed by name, ``modality/<sequence>`` and ``class/<label>``, never by position, so nothing
downstream depends on the order in which a file or a tensor happens to list them. The hash lets a
prior bank prove which texts it was encoded from.
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from datasets.labels import CLASS_NAMES, MODALITIES

#: The project's own prompt file, shipped beside this module.
DEFAULT_PROMPTS_PATH = Path(__file__).with_name("priors.toml")

MODALITY_SECTION = "modality"
CLASS_SECTION = "class"
#: Section -> the entry names it must hold, in canonical order.
SECTIONS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {MODALITY_SECTION: MODALITIES, CLASS_SECTION: CLASS_NAMES}
)


def modality_key(sequence: str) -> str:
    """Bank name of a sequence's intensity prior, e.g. ``modality/LGE``."""
    return f"{MODALITY_SECTION}/{sequence}"


def class_key(label: str) -> str:
    """Bank name of a class prompt, e.g. ``class/scar``."""
    return f"{CLASS_SECTION}/{label}"


def canonical_names() -> tuple[str, ...]:
    """Every name a complete prompt set holds: sequences in MODALITIES order, then classes."""
    return tuple(f"{section}/{entry}" for section, entries in SECTIONS.items()
                 for entry in entries)


def normalize_text(text: str) -> str:
    """Collapse runs of whitespace, so re-wrapping a line in the file changes neither hash nor
    embedding."""
    return " ".join(text.split())


def text_hash(texts: Mapping[str, str]) -> str:
    """SHA-256 of a canonical JSON of ``name -> text`` (keys sorted, UTF-8, no spacing).

    Independent of mapping order and of the file's layout; any change of a name or wording
    changes it.
    """
    canonical = json.dumps(dict(texts), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True, eq=False)
class PromptSet:
    """Validated prompt texts keyed by name (``modality/<sequence>``, ``class/<label>``).

    ``source`` names where the texts came from and prefixes every error, so a bad file is named.
    """

    texts: Mapping[str, str]
    source: str = "<prompts>"
    text_hash: str = field(init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.texts, Mapping):
            raise ValueError(f"{self.source}: texts must be a mapping name -> text, "
                             f"got {type(self.texts).__name__}")
        expected = canonical_names()
        unknown = sorted(set(self.texts) - set(expected))
        if unknown:
            raise ValueError(f"{self.source}: unknown prompt names {unknown}; "
                             f"expected exactly {list(expected)}")
        missing = [name for name in expected if name not in self.texts]
        if missing:
            raise ValueError(f"{self.source}: missing prompts {missing}")
        cleaned: dict[str, str] = {}
        for name in expected:
            text = self.texts[name]
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{self.source}: prompt {name!r} must be a non-empty string, "
                                 f"got {text!r}")
            cleaned[name] = normalize_text(text)
        object.__setattr__(self, "texts", MappingProxyType(cleaned))
        object.__setattr__(self, "text_hash", text_hash(cleaned))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.texts)

    def select(self, names: Iterable[str]) -> list[str]:
        """Texts for ``names`` in the order given (unknown names raise)."""
        names = list(names)
        unknown = [name for name in names if name not in self.texts]
        if unknown:
            raise ValueError(f"{self.source}: no prompts named {unknown}")
        return [self.texts[name] for name in names]


def parse_prompts(data: Mapping[str, Any], source: str = "<prompts>") -> PromptSet:
    """Turn the parsed TOML tree ``{section: {entry: {"text": ...}}}`` into a ``PromptSet``.

    Anything the schema does not know (another section, an unknown sequence or class, a key
    other than ``text``) is an error rather than silently ignored, because a typo such as
    ``[modality.T2W]`` would otherwise drop a prior.
    """
    unknown_sections = sorted(set(data) - set(SECTIONS))
    if unknown_sections:
        raise ValueError(f"{source}: unknown sections {unknown_sections}; "
                         f"allowed sections are {sorted(SECTIONS)}")
    texts: dict[str, str] = {}
    for section in SECTIONS:
        entries = data.get(section, {})
        if not isinstance(entries, Mapping):
            raise ValueError(f"{source}: [{section}] must be a table of [{section}.<name>] entries")
        for entry, body in entries.items():
            where = f"[{section}.{entry}]"
            if not isinstance(body, Mapping):
                raise ValueError(f"{source}: {where} must be a table with a 'text' key")
            extra = sorted(set(body) - {"text"})
            if extra:
                raise ValueError(f"{source}: {where} has unknown keys {extra}; only 'text' "
                                 "is allowed")
            if "text" not in body:
                raise ValueError(f"{source}: {where} has no 'text'")
            texts[f"{section}/{entry}"] = body["text"]
    return PromptSet(texts, source=source)


def load_prompts(path: str | os.PathLike[str] = DEFAULT_PROMPTS_PATH) -> PromptSet:
    """Read and validate a prompt file; every error names the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prompt file not found")
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path}: not valid TOML ({error})") from error
    return parse_prompts(data, source=str(path))
