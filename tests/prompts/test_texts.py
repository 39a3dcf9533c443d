"""Prompt file loading, validation and the text hash."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from datasets.labels import CLASS_NAMES, MODALITIES
from prompts.texts import (
    DEFAULT_PROMPTS_PATH,
    PromptSet,
    canonical_names,
    class_key,
    load_prompts,
    modality_key,
    parse_prompts,
    text_hash,
)


def _toml(entries: dict[str, str], extra: str = "") -> str:
    """A prompt file with one ``[section.name] text = ...`` table per entry."""
    blocks = [f'[{name.replace("/", ".")}]\ntext = "{text}"\n' for name, text in entries.items()]
    return extra + "\n".join(blocks)


def _entries() -> dict[str, str]:
    return {name: f"prompt for {name}" for name in canonical_names()}


def _write(tmp_path: Path, content: str) -> Path:
    path = tmp_path / "prompts.toml"
    path.write_text(content)
    return path


def test_shipped_file_is_complete():
    prompts = load_prompts(DEFAULT_PROMPTS_PATH)
    assert prompts.names == canonical_names()
    assert prompts.names[:3] == tuple(modality_key(m) for m in MODALITIES)
    assert prompts.names[3:] == tuple(class_key(c) for c in CLASS_NAMES)
    assert len(set(prompts.texts.values())) == len(prompts.names)
    assert len(prompts.text_hash) == 64


def test_good_file_keeps_texts_by_name(tmp_path):
    entries = _entries()
    prompts = load_prompts(_write(tmp_path, _toml(dict(reversed(entries.items())))))
    assert prompts.names == canonical_names()  # canonical order whatever the file's order
    assert dict(prompts.texts) == entries
    assert prompts.select(["class/scar", "modality/LGE"]) == [entries["class/scar"],
                                                             entries["modality/LGE"]]


@pytest.mark.parametrize("case, message", [
    ("missing_class", "missing prompts.*class/edema"),
    ("empty_text", "non-empty string"),
    ("unknown_section", "unknown sections.*extra"),
    ("unknown_modality", "unknown prompt names.*modality/PD"),
    ("unknown_key", "unknown keys.*note"),
    ("no_text", "has no 'text'"),
    ("bad_toml", "not valid TOML"),
])
def test_bad_files_raise_naming_the_file(tmp_path, case, message):
    entries = _entries()
    extra = ""
    if case == "missing_class":
        del entries["class/edema"]
    elif case == "empty_text":
        entries["class/scar"] = "   "
    elif case == "unknown_section":
        extra = '[extra.thing]\ntext = "x"\n'
    elif case == "unknown_modality":
        entries["modality/PD"] = "proton density"
    content = _toml(entries, extra)
    if case == "unknown_key":
        content += 'note = "x"\n'
    elif case == "no_text":
        content += "[class.more]\n"
    elif case == "bad_toml":
        content += "[class.scar\n"
    path = _write(tmp_path, content)
    with pytest.raises(ValueError, match=message) as info:
        load_prompts(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.toml"):
        load_prompts(tmp_path / "nope.toml")


def test_parse_rejects_non_table_entry():
    with pytest.raises(ValueError, match=r"<mem>: \[modality.LGE\] must be a table"):
        parse_prompts({"modality": {"LGE": "bright scar"}}, source="<mem>")


def test_text_hash_known_value_and_order_independence():
    expected = hashlib.sha256('{"a":"x","b":"é"}'.encode()).hexdigest()
    assert text_hash({"b": "é", "a": "x"}) == expected
    assert text_hash({"a": "x", "b": "é"}) == expected


def test_text_hash_stable_across_layout_but_not_wording():
    entries = _entries()
    base = PromptSet(entries)
    rewrapped = PromptSet({**entries, "class/scar": "  prompt  for\n class/scar "})
    assert rewrapped.text_hash == base.text_hash
    assert PromptSet(dict(reversed(entries.items()))).text_hash == base.text_hash
    changed = PromptSet({**entries, "class/scar": "prompt for class/scar."})
    assert changed.text_hash != base.text_hash
    renamed = {**entries, "modality/LGE": entries["modality/T2w"],
               "modality/T2w": entries["modality/LGE"]}
    assert PromptSet(renamed).text_hash != base.text_hash


def test_select_unknown_name():
    with pytest.raises(ValueError, match="no prompts named"):
        PromptSet(_entries()).select(["class/unknown"])
