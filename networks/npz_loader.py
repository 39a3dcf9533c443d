"""Pure functions mapping Google's R50+ViT npz checkpoints onto a ``TransUNetEncoder`` and back.

Every encoder parameter has exactly one file key (checked against ``named_parameters`` on each
call, so a new parameter without a key is a loud error, not a silently random weight). Loading
checks every key and shape first and only then copies, so a bad file leaves the model untouched.

Layout conversions (file -> torch):

* conv kernels HWIO -> OIHW; Dense kernels [in, out] -> Linear weights [out, in];
* attention query/key/value kernels [hidden, heads, head_dim] -> [hidden, hidden] (transposed),
  their biases [heads, head_dim] -> [hidden]; the out kernel [heads, head_dim, hidden] ->
  [hidden, hidden] (transposed);
* ``Transformer/posembed_input/pos_embedding`` [1, 1 + g0*g0, hidden]: the class-token row is
  dropped and the g0 x g0 grid is resized bilinearly to the encoder's grid;
* ``conv_root/kernel`` with ``c`` input channels loaded into an encoder with ``n != c`` input
  channels: each of the ``n`` model channels gets ``sum over the c file channels / n``. An input
  whose ``n`` channels all hold the same image x then gives exactly the response the original
  kernel gives to x repeated over its ``c`` channels; for ``n = 1`` (one MR sequence per
  encoder) it is the plain sum of the RGB kernels. (Weight standardisation removes the overall
  scale anyway, so only the spatial pattern matters.)
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from networks.transunet import TransUNetEncoder

POS_EMBED_KEY = "Transformer/posembed_input/pos_embedding"
ROOT_CONV_KEY = "conv_root/kernel"

Convert = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class LoadReport:
    """What ``load_google_npz`` did.

    ``loaded``: file keys copied into the encoder; ``unused``: file keys the encoder has no
    parameter for (classifier head, class token, ...); ``resized_pos_embed``: (file grid, model
    grid) when the position grid was resized; ``adapted_in_channels``: (file, model) input
    channels when the root kernel was adapted.
    """

    loaded: tuple[str, ...]
    unused: tuple[str, ...]
    resized_pos_embed: tuple[int, int] | None = None
    adapted_in_channels: tuple[int, int] | None = None


@dataclass(frozen=True)
class _Entry:
    """One file key <-> one parameter, with the file-side shape and both conversions."""

    key: str
    param: str
    file_shape: tuple[int, ...]
    to_torch: Convert
    to_file: Convert


def _identity(a: np.ndarray) -> np.ndarray:
    return a


def _hwio_to_oihw(a: np.ndarray) -> np.ndarray:
    return a.transpose(3, 2, 0, 1)


def _oihw_to_hwio(a: np.ndarray) -> np.ndarray:
    return a.transpose(2, 3, 1, 0)


def _transpose(a: np.ndarray) -> np.ndarray:
    return a.T


def _entries(encoder: TransUNetEncoder) -> list[_Entry]:
    """The complete key map of ``encoder``, built from its structure (not from name parsing)."""
    params = dict(encoder.named_parameters())
    out: list[_Entry] = []

    def add(key: str, param: str, kind: str) -> None:
        shape = tuple(params[param].shape)
        if kind == "conv":
            o, i, h, w = shape
            out.append(_Entry(key, param, (h, w, i, o), _hwio_to_oihw, _oihw_to_hwio))
        elif kind == "dense":
            out.append(_Entry(key, param, shape[::-1], _transpose, _transpose))
        elif kind == "vector":
            out.append(_Entry(key, param, shape, _identity, _identity))
        else:  # pragma: no cover - programming error
            raise AssertionError(kind)

    def add_norm(prefix: str, module: str, scale: str = "scale") -> None:
        add(f"{prefix}/{scale}", f"{module}.weight", "vector")
        add(f"{prefix}/bias", f"{module}.bias", "vector")

    # ResNet stem.
    add(ROOT_CONV_KEY, "resnet.root.conv.weight", "conv")
    add_norm("gn_root", "resnet.root.gn")
    for s, stage in enumerate(encoder.resnet.stages):
        for u, unit in enumerate(stage):
            prefix, module = f"block{s + 1}/unit{u + 1}", f"resnet.stages.{s}.{u}"
            names = ["1", "2", "3"] + (["_proj"] if unit.conv_proj is not None else [])
            for n in names:
                add(f"{prefix}/conv{n}/kernel", f"{module}.conv{n}.weight", "conv")
                add_norm(f"{prefix}/gn{n}", f"{module}.gn{n}")

    # Embedding and transformer.
    add("embedding/kernel", "vit.embeddings.patch_embeddings.weight", "conv")
    add("embedding/bias", "vit.embeddings.patch_embeddings.bias", "vector")
    add(POS_EMBED_KEY, "vit.embeddings.position_embeddings", "vector")
    add_norm("Transformer/encoder_norm", "vit.encoder.encoder_norm")
    vit = encoder.vit.config
    heads, head_dim, hidden = vit.num_heads, vit.head_dim, vit.hidden_size
    for i in range(len(encoder.vit.encoder.layers)):
        prefix, module = f"Transformer/encoderblock_{i}", f"vit.encoder.layers.{i}"
        add_norm(f"{prefix}/LayerNorm_0", f"{module}.attention_norm")
        add_norm(f"{prefix}/LayerNorm_2", f"{module}.mlp_norm")
        for dense, linear in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
            add(f"{prefix}/MlpBlock_3/{dense}/kernel", f"{module}.mlp.{linear}.weight", "dense")
            add(f"{prefix}/MlpBlock_3/{dense}/bias", f"{module}.mlp.{linear}.bias", "vector")
        attn_key, attn = f"{prefix}/MultiHeadDotProductAttention_1", f"{module}.attention"
        for proj in ("query", "key", "value"):
            out.append(_Entry(
                f"{attn_key}/{proj}/kernel", f"{attn}.{proj}.weight", (hidden, heads, head_dim),
                lambda a: a.reshape(hidden, hidden).T,
                lambda w: w.T.reshape(hidden, heads, head_dim),
            ))
            out.append(_Entry(
                f"{attn_key}/{proj}/bias", f"{attn}.{proj}.bias", (heads, head_dim),
                lambda a: a.reshape(hidden), lambda b: b.reshape(heads, head_dim),
            ))
        out.append(_Entry(
            f"{attn_key}/out/kernel", f"{attn}.out.weight", (heads, head_dim, hidden),
            lambda a: a.reshape(hidden, hidden).T,
            lambda w: w.T.reshape(heads, head_dim, hidden),
        ))
        add(f"{attn_key}/out/bias", f"{attn}.out.bias", "vector")

    _check_coverage(out, params)
    return out


def _check_coverage(entries: list[_Entry], params: Mapping[str, torch.nn.Parameter]) -> None:
    mapped = [e.param for e in entries]
    duplicated = sorted({p for p in mapped if mapped.count(p) > 1})
    unmapped = sorted(set(params) - set(mapped))
    if duplicated or unmapped:
        raise RuntimeError(
            f"npz key map out of date with the encoder: parameters mapped twice {duplicated}, "
            f"never mapped {unmapped}"
        )


def read_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """All arrays of an npz file, read eagerly so no file handle stays open."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"npz weight file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: np.asarray(data[key]) for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ValueError(f"cannot read npz weight file {path}: {exc}") from exc


class _ShapeError(ValueError):
    pass


def _convert_pos_embed(array: np.ndarray, entry: _Entry) -> tuple[np.ndarray, int]:
    """[1, 1 + g0*g0, hidden] -> [1, g*g, hidden] and g0: drop the class token, resize grid."""
    _, tokens, hidden = entry.file_shape
    grid = math.isqrt(tokens)
    if array.ndim != 3 or array.shape[0] != 1 or array.shape[2] != hidden:
        raise _ShapeError(f"expected [1, 1 + g*g, {hidden}], got {array.shape}")
    file_grid = math.isqrt(array.shape[1] - 1) if array.shape[1] > 1 else 0
    if file_grid < 1 or file_grid**2 + 1 != array.shape[1]:
        raise _ShapeError(
            f"expected a class-token row plus a square grid of tokens, got {array.shape[1]} tokens"
        )
    tokens_grid = array[0, 1:].astype(np.float32, copy=False)
    if file_grid == grid:
        return tokens_grid[None], file_grid
    as_image = torch.from_numpy(np.ascontiguousarray(tokens_grid.T)).reshape(
        1, hidden, file_grid, file_grid
    )
    resized = F.interpolate(as_image, size=(grid, grid), mode="bilinear", align_corners=False)
    return resized.reshape(hidden, grid * grid).T.numpy()[None], file_grid


def _convert_root_conv(array: np.ndarray, entry: _Entry) -> tuple[np.ndarray, int]:
    """HWIO root kernel with any input-channel count -> OIHW for the model's channels."""
    kh, kw, in_ch, out_ch = entry.file_shape
    if array.ndim != 4 or (array.shape[0], array.shape[1], array.shape[3]) != (kh, kw, out_ch):
        raise _ShapeError(f"expected [{kh}, {kw}, C, {out_ch}], got {array.shape}")
    file_in = array.shape[2]
    if file_in != in_ch:
        summed = array.sum(axis=2, keepdims=True, dtype=np.float64) / in_ch
        array = np.repeat(summed.astype(np.float32), in_ch, axis=2)
    return _hwio_to_oihw(array), file_in


def load_google_npz(
    encoder: TransUNetEncoder, weights: Mapping[str, np.ndarray]
) -> LoadReport:
    """Copy Google-layout ``weights`` into ``encoder`` after checking every key and shape.

    Raises ``ValueError`` naming all missing keys and all shape mismatches; nothing is copied
    then. Keys the encoder does not use are returned in ``LoadReport.unused``.
    """
    entries = _entries(encoder)
    missing = [e.key for e in entries if e.key not in weights]
    problems: list[str] = []
    values: dict[str, np.ndarray] = {}
    file_grid = file_in = None
    for entry in entries:
        if entry.key not in weights:
            continue
        array = np.asarray(weights[entry.key])
        try:
            if not np.issubdtype(array.dtype, np.number):
                raise _ShapeError(f"non-numeric dtype {array.dtype}")
            if entry.key == POS_EMBED_KEY:
                value, file_grid = _convert_pos_embed(array, entry)
            elif entry.key == ROOT_CONV_KEY:
                value, file_in = _convert_root_conv(array, entry)
            elif array.shape != entry.file_shape:
                raise _ShapeError(f"expected {entry.file_shape}, got {array.shape}")
            else:
                value = entry.to_torch(array)
        except _ShapeError as exc:
            problems.append(f"{entry.key}: {exc}")
            continue
        values[entry.param] = value
    if missing or problems:
        raise ValueError(
            "cannot load Google npz weights into the encoder:"
            + (f"\n  missing keys ({len(missing)}): {missing}" if missing else "")
            + (f"\n  shape mismatches ({len(problems)}): {problems}" if problems else "")
        )
    params = dict(encoder.named_parameters())
    with torch.no_grad():
        for name, value in values.items():
            params[name].copy_(torch.from_numpy(np.ascontiguousarray(value)))
    used = {e.key for e in entries}
    model_grid = encoder.img_size // encoder.vit.config.patch_size
    return LoadReport(
        loaded=tuple(e.key for e in entries),
        unused=tuple(sorted(set(weights) - used)),
        resized_pos_embed=None if file_grid == model_grid else (file_grid, model_grid),
        adapted_in_channels=None if file_in == encoder.in_channels else (file_in,
                                                                         encoder.in_channels),
    )


def export_google_weights(encoder: TransUNetEncoder) -> dict[str, np.ndarray]:
    """Encoder parameters in the Google layout (inverse of ``load_google_npz``).

    The position embedding gets a zero class-token row in front, as the Google files have one.
    """
    params = dict(encoder.named_parameters())
    arrays: dict[str, np.ndarray] = {}
    for entry in _entries(encoder):
        value = params[entry.param].detach().cpu().numpy()
        if entry.key == POS_EMBED_KEY:
            value = np.concatenate([np.zeros_like(value[:, :1]), value], axis=1)
        arrays[entry.key] = np.ascontiguousarray(entry.to_file(value))
    return arrays


def write_google_npz(encoder: TransUNetEncoder, path: str | os.PathLike[str]) -> Path:
    """Write ``export_google_weights(encoder)`` to exactly ``path`` (no suffix is appended)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        np.savez(handle, **export_google_weights(encoder))
    return path


def iter_key_map(encoder: TransUNetEncoder) -> Iterator[tuple[str, str]]:
    """(file key, parameter name) pairs, e.g. to document or debug the mapping."""
    for entry in _entries(encoder):
        yield entry.key, entry.param
