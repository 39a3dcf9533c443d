"""Command-line flags made from a config dataclass: each setting is declared once, on its field.

A field's ``metadata`` (written with :func:`utils.setting`) carries what the flag needs beyond
its name, type and default:

* ``help``: the flag's help (the default is appended, so ``--help`` always shows the value used);
* ``choices``: allowed values, or a callable returning them (registries fill up at import);
* ``shown``: what the help says the default is, where the program derives it;
* ``flag``: the flag's name where it is not the field's (a bool's full spelling, e.g. no_qa);
* ``cli=False``: not a flag (derived by the program, e.g. the dataset's class count).

Types come from the annotation: ``int``, ``float``, ``str``, each optionally ``| None``;
``tuple[float, ...] | None`` takes several values; ``bool`` becomes ``--name`` when the default is
False and ``--no_name`` when it is True (the spellings train.py has always had).

Flags are added with ``default=SUPPRESS``, so :func:`given_values` returns only what the user
typed; a program lays those over its defaults or over a saved config (``--config``). With
``fill_defaults`` the namespace holds every field instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from utils import field_default, unknown_fields

_SCALARS = {"int": int, "float": float, "str": str, "Path": Path}


def _flag_type(annotation: str) -> tuple[type, bool]:
    """``(element type, several values)`` of a field annotation written as a string."""
    parts = {part.strip() for part in annotation.split("|")} - {"None"}
    if len(parts) != 1:
        raise TypeError(f"cannot make a flag of type {annotation!r}")
    (kind,) = parts
    if kind in _SCALARS:
        return _SCALARS[kind], False
    if kind.startswith("tuple[") and kind.endswith(", ...]"):
        return _SCALARS[kind[len("tuple["):-len(", ...]")]], True
    raise TypeError(f"cannot make a flag of type {annotation!r}")


def add_config_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup,
                         cls: type, only: frozenset[str] | None = None,
                         fill_defaults: bool = False) -> None:
    """One flag per field of dataclass ``cls`` (fields with ``cli=False`` left out; with
    ``only``, just those fields). ``fill_defaults`` puts the field defaults into the namespace
    (for programs that lay no saved config under the flags)."""
    for field in dataclasses.fields(cls):
        meta = field.metadata
        if not meta.get("cli", True) or (only is not None and field.name not in only):
            continue
        default = field_default(field)
        choices = meta.get("choices")
        if callable(choices):
            choices = choices()
        text = meta.get("help") or ""
        name = meta.get("flag") or field.name
        if field.type == "bool":
            flag = f"--{name}" if meta.get("flag") else (
                f"--no_{name}" if default else f"--{name}")
            parser.add_argument(flag, dest=field.name,
                                default=default if fill_defaults else argparse.SUPPRESS,
                                action="store_false" if default else "store_true",
                                help=text or None)
            continue
        kind, several = _flag_type(field.type)
        shown = meta.get("shown") or ("none" if default is None else default)
        parser.add_argument(f"--{name}", dest=field.name, type=kind,
                            nargs="+" if several else None, choices=choices,
                            default=default if fill_defaults else argparse.SUPPRESS,
                            help=f"{text} (default: {shown})".lstrip().replace("%", "%%"))


def given_values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` the user gave on the command line (lists become tuples); fields
    kept off the command line (``cli=False``) are never taken, even where another flag has
    their name."""
    names = {field.name for field in dataclasses.fields(cls) if field.metadata.get("cli", True)}
    return {name: tuple(value) if isinstance(value, list) else value
            for name, value in vars(args).items() if name in names}


def read_config_file(path: str | Path, cls: type) -> dict[str, Any]:
    """A saved config (a run's ``config.json``) as field values of ``cls``; keys the class does
    not know are refused, naming the file."""
    path = Path(path)
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: config file not found") from None
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable JSON config ({error})") from error
    if not isinstance(values, Mapping):
        raise ValueError(f"{path}: a config file holds one JSON object")
    unknown = unknown_fields(cls, values)
    if unknown:
        raise ValueError(f"{path}: unknown setting(s) {unknown} for {cls.__name__}")
    return {key: tuple(value) if isinstance(value, list) else value
            for key, value in values.items()}
