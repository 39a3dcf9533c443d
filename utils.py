"""Small helpers shared across the framework: atomic file writes, seeding, device choice, logging,
checks of numeric settings."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import numbers
import os
import random
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

_T = TypeVar("_T")


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only on success.

    Readers never see a half-written file, and a crash leaves the previous version intact. The
    temporary name keeps the target's suffixes because some writers (nibabel, numpy) choose the
    format from them.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(target.suffixes)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}",
                                    dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp creates owner-only files
        os.replace(tmp, target)
    except OSError as error:
        # A full disk or a lost mount surfaces from deep inside a writer (h5py, torch, zipfile)
        # often without any path: say which file could not be written.
        if str(target) in str(error):
            raise
        raise OSError(error.errno, f"{target}: cannot write ({error.strerror or error})"
                      ) from error
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temporaries(folder: str | os.PathLike[str], pattern: str = "*") -> list[Path]:
    """Delete the temporaries :func:`atomic_path` left for targets matching ``pattern`` in
    ``folder`` when a process was killed mid-write (SIGKILL skips the clean-up). Only for
    folders one process writes, e.g. a run folder at the start of training."""
    removed = []
    for path in Path(folder).glob(f".{pattern}.*.tmp*"):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def json_text(payload: Any) -> str:
    """``payload`` as the indented, key-sorted JSON every file of the framework uses."""
    return json.dumps(payload, indent=2, sort_keys=True, default=_json_default) + "\n"


def write_json(target: str | os.PathLike[str], payload: Any) -> None:
    """Write ``payload`` as indented JSON atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(json_text(payload))


def write_text(target: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes: names a checkpoint's exact weights in manifests."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")


class ConfigRecord:
    """Base of the config dataclasses: ``to_dict`` is the plain nested dict a manifest or a
    checkpoint stores (JSON-able; tuples become lists once serialised)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


def field_default(field: dataclasses.Field) -> Any:
    """A dataclass field's default (its factory called); TypeError for a field without one."""
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    raise TypeError(f"field {field.name} has no default")


def unknown_fields(cls: type, keys: Iterable[str]) -> list[str]:
    """The ``keys`` that name no field of dataclass ``cls``, sorted."""
    return sorted(set(keys) - {field.name for field in dataclasses.fields(cls)})


def from_mapping(cls: type[_T], data: Mapping[str, Any]) -> _T:
    """Build a flat dataclass from a mapping, naming unknown keys instead of ignoring them."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{cls.__name__} expects a mapping, got {type(data).__name__}")
    unknown = unknown_fields(cls, data)
    if unknown:
        known = sorted(field.name for field in dataclasses.fields(cls))
        raise ValueError(f"unknown {cls.__name__} keys: {unknown}; known: {known}")
    return cls(**data)


def setting(default: Any, help: str = "", *, choices: Any = None, shown: str | None = None,
            flag: str | None = None, cli: bool = True) -> Any:
    """A config dataclass field declared with what its command-line flag needs.

    ``help`` and ``choices`` (a collection, or a callable returning one) go to the flag;
    ``shown`` replaces the default in the help where the program derives it (e.g. a run folder
    named after other settings); ``flag`` names the flag where it is not the field's name (kept
    from earlier versions of a command); ``cli=False`` keeps the field off the command line. For
    a bool defaulting to True the flag is ``--no_<name>`` and ``help`` describes that flag. Read
    by :mod:`commands.config_flags`.
    """
    metadata = {"help": help, "choices": choices, "shown": shown, "flag": flag, "cli": cli}
    if isinstance(default, list | dict | set):
        raise TypeError("mutable defaults need a default_factory")
    return dataclasses.field(default=default, metadata=metadata)


def aligned_rows(header: Sequence[str], body: Iterable[Sequence[str]]) -> list[str]:
    """A plain-text table's lines: the header, then the body rows, columns two spaces apart, the
    first left-aligned and the others right-aligned (numbers line up)."""
    rows = [list(header), *(list(row) for row in body)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return ["  ".join([row[0].ljust(widths[0]),
                       *(cell.rjust(width) for cell, width in zip(row[1:], widths[1:],
                                                                  strict=True))])
            for row in rows]


def check_int(name: str, value: Any, minimum: int = 1) -> None:
    """Refuse anything but an int >= ``minimum``; bool counts as a mistake, not an int."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def require_finite(*, positive: bool = False, **values: object) -> None:
    """Raise ``ValueError`` naming the first of ``values`` that is not a finite real number >= 0
    (> 0 with ``positive``). Bools are refused: ``True`` passed as a weight is a mistake."""
    bound = "> 0" if positive else ">= 0"
    for name, value in values.items():
        if (isinstance(value, bool) or not isinstance(value, numbers.Real)
                or not math.isfinite(value) or value < 0 or (positive and value == 0)):
            raise ValueError(f"{name} must be finite and {bound}, got {value!r}")


def require_finite_fields(owner: object, *names: str, positive: bool = False) -> None:
    """:func:`require_finite` on attributes of ``owner`` (a config's ``__post_init__``)."""
    require_finite(positive=positive, **{name: getattr(owner, name) for name in names})


def non_finite_tensors(state: Any) -> list[str]:
    """Names of the floating-point tensors of a state dict that hold NaN or Inf."""
    items = state.items() if isinstance(state, dict) else ()
    return [name for name, value in items
            if torch.is_tensor(value) and value.is_floating_point()
            and not bool(torch.isfinite(value).all())]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) for reproducible runs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    """Turn a ``--device`` flag into a device; ``auto`` prefers CUDA, then CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def setup_logging(log_file: str | os.PathLike[str] | None = None,
                  level: int = logging.INFO) -> None:
    """Log to stderr and, when given, to ``log_file`` (appending), with one shared format."""
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=handlers, force=True)


def load_torch_file(path: str | os.PathLike[str], what: str, *, missing: str | None = None,
                    unreadable: str | None = None, weights_only: bool = True) -> Any:
    """The object a ``torch.save`` file holds, read on the CPU; every error names the file.

    ``what`` names the expected content; ``missing`` and ``unreadable`` replace the messages for
    an absent file ("<what> not found") and an unreadable one ("unreadable <what>"). The one reader
    behind checkpoints, VoxelMorph fields and prior banks, so that a truncated or foreign file
    gives the same kind of message everywhere. ``weights_only=False`` is for the framework's own
    checkpoints, which hold plain Python objects (the training RNG states).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {missing or f'{what} not found'}")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as error:  # torch raises several types for truncated/foreign files
        raise ValueError(f"{path}: {unreadable or f'unreadable {what}'} ({error})") from error
