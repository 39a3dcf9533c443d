"""A sentence-embedding text tower from a local Hugging Face folder, without sentence-transformers.

Models such as sentence-transformers/all-MiniLM-L6-v2 are a plain transformers encoder (BERT)
followed by a pooling step over the token states. The folder they are saved in says everything
needed to rebuild them with transformers alone:

    config.json                    the encoder architecture
    model.safetensors              its weights (or pytorch_model.bin)
    tokenizer.json / vocab.txt     the tokenizer (plus tokenizer_config.json where present)
    1_Pooling/config.json          pooling: mean over real tokens, or the first ([CLS]) token
    modules.json                   optional: the module chain; only Transformer, Pooling and
                                   Normalize are understood, anything else (a Dense projection)
                                   is refused because skipping it would change the embeddings
    sentence_bert_config.json      optional: max_seq_length, do_lower_case

Nothing is fetched from the network. The tower plugs into ``prompts.encode.encode_texts``: the
tokenizer pads every text to the context length, and the tower rebuilds the attention mask from
the pad id, so padding never changes an embedding. (A BERT tokenizer emits [PAD] for padding only.)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

POOLING_MODES = ("mean", "cls")
POOLING_CONFIG = "config.json"
DEFAULT_POOLING_DIR = "1_Pooling"
MODULES_FILE = "modules.json"
SENTENCE_CONFIG_FILE = "sentence_bert_config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
#: The sentence-transformers module types this tower reproduces, by the last part of their name.
KNOWN_MODULES = ("Transformer", "Pooling", "Normalize")
#: Pooling-config flags -> mode; any other flag set to true is unsupported.
_POOLING_FLAGS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error


def read_pooling(path: str | os.PathLike[str]) -> tuple[str, int | None]:
    """Pooling mode (``mean`` or ``cls``) and declared width from a pooling config.

    The config selects its mode with boolean ``pooling_mode_*`` flags (or a ``pooling_mode``
    string); max, weighted-mean, last-token and sqrt-length pooling are refused, not approximated.
    """
    path = Path(path)
    config = _read_json(path)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if isinstance(config.get("pooling_mode"), str):
        modes = [config["pooling_mode"]]
    else:
        modes = [_POOLING_FLAGS.get(key, key) for key, value in config.items()
                 if key.startswith("pooling_mode_") and value is True]
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise ValueError(f"{path}: pooling {modes or 'none'} is not supported; exactly one of "
                         f"{list(POOLING_MODES)} must be selected")
    width = config.get("word_embedding_dimension")
    return modes[0], width if isinstance(width, int) else None


def module_dirs(directory: Path) -> tuple[Path, Path]:
    """The encoder folder and the pooling folder, from modules.json when the folder has one."""
    modules_path = directory / MODULES_FILE
    if not modules_path.is_file():
        return directory, directory / DEFAULT_POOLING_DIR
    modules = _read_json(modules_path)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ValueError(f"{modules_path}: expected a list of module entries")
    found: dict[str, Path] = {}
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind not in KNOWN_MODULES:
            raise ValueError(f"{modules_path}: module {module.get('type')!r} is not supported "
                             f"(only {', '.join(KNOWN_MODULES)}); leaving it out would change "
                             "the embeddings")
        found[kind] = directory / str(module.get("path", ""))
    missing = [kind for kind in ("Transformer", "Pooling") if kind not in found]
    if missing:
        raise ValueError(f"{modules_path}: no {' or '.join(missing)} module")
    return found["Transformer"], found["Pooling"]


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """The encoder weights, preferring safetensors; never unpickles arbitrary objects."""
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                return load_file(str(path), device="cpu")
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # both readers raise several types for corrupt files
            raise ValueError(f"{path}: cannot be read ({error})") from error
    raise FileNotFoundError(f"{directory}: no weights ({' or '.join(WEIGHT_FILES)})")


def match_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]
                     ) -> dict[str, torch.Tensor]:
    """Checkpoint entries for ``model``, checked name by name and shape by shape.

    Every parameter must be present with its shape. A checkpoint saved from a task model may
    prefix names with ``base_model_prefix`` (``bert.``); that prefix is dropped. Entries the
    encoder does not need are tolerated only for the pooler head (unused: pooling is done on the
    token states) and for buffers the model rebuilds itself (``position_ids``).
    """
    expected = model.state_dict()
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    if prefix != "." and not set(state) & set(expected):
        state = {key.removeprefix(prefix): value for key, value in state.items()}
    rebuilt = {name for name, _ in model.named_buffers()} - set(expected)
    unexpected = sorted(key for key in set(state) - set(expected)
                        if key.split(".", 1)[0] != "pooler" and key not in rebuilt)
    parameters = {name for name, _ in model.named_parameters()}
    missing = sorted(name for name in parameters if name not in state)
    mismatched = sorted(f"{name}: {tuple(state[name].shape)} != {tuple(tensor.shape)}"
                        for name, tensor in expected.items()
                        if name in state and state[name].shape != tensor.shape)
    problems = [f"{len(names)} {what} ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"
                for what, names in (("missing", missing), ("unexpected", unexpected),
                                    ("shape mismatches", mismatched)) if names]
    if problems:
        raise ValueError(f"weights do not fit {type(model).__name__}: {'; '.join(problems)}")
    return {name: state[name] for name in expected if name in state}


class SentenceTower(nn.Module):
    """Encoder + pooling; ``encode_text(ids)`` gives one (unnormalised) vector per text."""

    def __init__(self, encoder: nn.Module, pooling: str, pad_id: int) -> None:
        super().__init__()
        if pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {POOLING_MODES}, got {pooling!r}")
        if not isinstance(pad_id, int) or pad_id < 0:
            raise ValueError(f"pad_id must be a non-negative integer, got {pad_id!r}")
        self.encoder = encoder
        self.pooling = pooling
        self.pad_id = pad_id

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.ndim != 2 or ids.dtype != torch.long:
            raise ValueError(f"ids must be a [B, L] long tensor, got {ids.dtype} "
                             f"{tuple(ids.shape)}")
        mask = ids != self.pad_id
        hidden = self.encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-9)

    forward = encode_text


class SentenceTokenizer:
    """Texts -> ``[B, context_length]`` token ids, padded with the pad id (open_clip's contract)."""

    def __init__(self, tokenizer: Any, context_length: int, lowercase: bool = False) -> None:
        if not isinstance(context_length, int) or context_length < 2:
            raise ValueError(f"context_length must be an integer >= 2, got {context_length!r}")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token, so padding cannot be masked")
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.lowercase = lowercase

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        texts = [text.lower() for text in texts] if self.lowercase else list(texts)
        encoded = self.tokenizer(texts, padding="max_length", truncation=True,
                                 max_length=self.context_length, return_tensors="pt")
        return encoded["input_ids"].long()


def _context_length(directory: Path, config: Any, tokenizer: Any) -> tuple[int, bool]:
    """Sequence length and lowercasing as sentence-transformers would use them."""
    settings = {}
    if (directory / SENTENCE_CONFIG_FILE).is_file():
        settings = _read_json(directory / SENTENCE_CONFIG_FILE)
    limits = [value for value in (settings.get("max_seq_length"),
                                  getattr(config, "max_position_embeddings", None),
                                  getattr(tokenizer, "model_max_length", None))
              if isinstance(value, int) and value > 0]
    if not limits:
        raise ValueError(f"{directory}: no sequence length in {SENTENCE_CONFIG_FILE}, "
                         "config.json or the tokenizer config")
    return min(limits), bool(settings.get("do_lower_case", False))


def build_sentence_tower(directory: str | os.PathLike[str]
                         ) -> tuple[SentenceTower, SentenceTokenizer]:
    """An eval-mode tower and its tokenizer from a local sentence-transformers folder.

    Raises FileNotFoundError for missing files and ValueError for configs or weights this tower
    cannot reproduce exactly; it never falls back to random weights.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: model folder not found")
    encoder_dir, pooling_dir = module_dirs(directory)
    pooling, width = read_pooling(pooling_dir / POOLING_CONFIG)
    if not (encoder_dir / "config.json").is_file():
        raise FileNotFoundError(f"{encoder_dir / 'config.json'}: missing")
    state = read_state_dict(encoder_dir)
    from transformers import AutoConfig, AutoModel, AutoTokenizer  # seconds to import

    try:
        config = AutoConfig.from_pretrained(str(encoder_dir), local_files_only=True)
        hf_tokenizer = AutoTokenizer.from_pretrained(str(encoder_dir), local_files_only=True)
        encoder = AutoModel.from_config(config)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"{encoder_dir}: cannot build the encoder or tokenizer ({error})"
                         ) from error
    if width is not None and width != getattr(config, "hidden_size", width):
        raise ValueError(f"{pooling_dir / POOLING_CONFIG}: word_embedding_dimension {width} != "
                         f"the encoder's hidden_size {config.hidden_size}")
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None  # the pooler head is never used: pooling runs on the token states
    encoder.load_state_dict(match_state_dict(encoder, state), strict=False)
    tokenizer = SentenceTokenizer(hf_tokenizer, *_context_length(directory, config, hf_tokenizer))
    tower = SentenceTower(encoder.float(), pooling, int(hf_tokenizer.pad_token_id)).eval()
    return tower, tokenizer
