"""Small helpers shared across the framework: atomic file writes, seeding, device choice, logging,
checks of numeric settings."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import numbers
import os
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch


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


def read_checkpoint(path: str | os.PathLike[str], missing: str = "checkpoint not found") -> dict:
    """The dict a framework checkpoint holds; clear errors for absent, corrupt or foreign files.

    ``missing`` is the message for an absent file (what the caller was looking for).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {missing}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises several types for truncated/corrupt files
        raise ValueError(f"{path}: unreadable checkpoint ({error})") from error
    if not isinstance(payload, dict):
        raise ValueError(f"{path}: not a checkpoint of this framework")
    return payload
