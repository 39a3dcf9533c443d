"""A sentence-embedding text tower from a local folder, run by sentence-transformers.

A sentence-transformers folder (the layout of sentence-transformers/all-MiniLM-L6-v2) lists its
module chain in modules.json: a transformers encoder, a pooling step over its token states and,
depending on the model, Normalize or a Dense projection. ``SentenceTransformer`` runs that chain
the way the model's authors run it, so the embeddings are the model's own. It replaced this
module's rebuild with transformers alone (encoder + mean/CLS pooling) after a measurement against
that rebuild on all-MiniLM-L6-v2 and the 7 texts of prompts/priors.toml, one CPU thread: the
L2-normalised embeddings agreed to 1.3e-7 (max |diff|), and encoding took 0.07 s instead of
0.35 s because each batch is padded to its longest text rather than to the 256-token context.
bench/bench_library_swaps.py repeats the comparison against the rebuild's computation.

What this module adds around the library:

* the folder is checked first, so a missing or incomplete folder is reported with the missing
  file or folder named, not as a TypeError from deep inside the library;
* nothing is fetched: the folder is read with ``local_files_only`` and a modules.json type that is
  not part of sentence-transformers (third-party code) is refused, never imported;
* the weight file is checked name by name and shape by shape against the encoder before loading,
  and value by value after it, because transformers fills a weight the file lacks with random
  values and only prints a report;
* a pooling width that disagrees with the encoder's hidden size is refused.

Folder layout:

    modules.json                   the module chain; without it the folder must hold
                                   1_Pooling/config.json and the chain is encoder + that pooling
    config.json                    the encoder architecture (in the Transformer module's folder)
    model.safetensors              its weights (or pytorch_model.bin)
    tokenizer.json / vocab.txt     the tokenizer (plus tokenizer_config.json where present)
    1_Pooling/config.json          the pooling mode(s), as sentence-transformers defines them
    sentence_bert_config.json      optional: max_seq_length, do_lower_case
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from utils import load_torch_file

log = logging.getLogger("prompts.sentence_tower")

POOLING_CONFIG = "config.json"
ENCODER_CONFIG = "config.json"
DEFAULT_POOLING_DIR = "1_Pooling"
#: The pooling width, under its saved name and the name sentence-transformers 6 renamed it to.
POOLING_WIDTH_KEYS = ("word_embedding_dimension", "embedding_dimension")
MODULES_FILE = "modules.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
#: modules.json types must come from this package: anything else would run third-party code.
LIBRARY_PREFIX = "sentence_transformers."
#: Module kinds (last part of the type) the chain must contain.
REQUIRED_MODULES = ("Transformer", "Pooling")
#: Module kinds that keep no files, so their folder may be absent (all-MiniLM-L6-v2 ships no
#: 2_Normalize folder).
FILELESS_MODULES = ("Normalize",)


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error


def module_dirs(directory: Path) -> tuple[Path, Path]:
    """The encoder folder and the pooling folder, checked against modules.json when present.

    Module names must be unique; every listed module must be a sentence-transformers type and,
    unless it keeps no files, have its folder (a Dense projection, say); the chain must hold a
    Transformer and a Pooling module.
    """
    modules_path = directory / MODULES_FILE
    if not modules_path.is_file():
        return directory, directory / DEFAULT_POOLING_DIR
    modules = _read_json(modules_path)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ValueError(f"{modules_path}: expected a list of module entries")
    names = [str(module.get("name", "")) for module in modules]
    if len(set(names)) != len(names):
        # sentence-transformers keys modules by name: a repeated name silently drops a module.
        raise ValueError(f"{modules_path}: module names repeat ({', '.join(names)})")
    found: dict[str, Path] = {}
    for module in modules:
        kind_ref = str(module.get("type", ""))
        if not kind_ref.startswith(LIBRARY_PREFIX):
            raise ValueError(f"{modules_path}: module {kind_ref!r} is not part of "
                             "sentence-transformers; third-party module code is never run")
        kind = kind_ref.rsplit(".", 1)[-1]
        folder = directory / str(module.get("path", ""))
        # The Transformer and Pooling folders are checked file by file by build_sentence_tower.
        if kind not in (*FILELESS_MODULES, *REQUIRED_MODULES) and not folder.is_dir():
            raise FileNotFoundError(f"{folder}: missing (the folder of the {kind} module listed "
                                    f"in {modules_path})")
        found.setdefault(kind, folder)
    missing = [kind for kind in REQUIRED_MODULES if kind not in found]
    if missing:
        raise ValueError(f"{modules_path}: no {' or '.join(missing)} module")
    return found["Transformer"], found["Pooling"]


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """The encoder weights, preferring safetensors; never unpickles arbitrary objects."""
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        if path.suffix != ".safetensors":
            return load_torch_file(path, "weight file", unreadable="cannot be read")
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as error:  # safetensors raises several types for corrupt files
            raise ValueError(f"{path}: cannot be read ({error})") from error
    raise FileNotFoundError(f"{directory}: no weights ({' or '.join(WEIGHT_FILES)})")


def _is_pooler(name: str) -> bool:
    """The BERT pooler head: sentence pooling runs on the token states, so it is never used."""
    return name.split(".", 1)[0] == "pooler"


def match_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]
                     ) -> dict[str, torch.Tensor]:
    """Checkpoint entries for ``model``, checked name by name and shape by shape.

    Every parameter must be present with its shape, except the unused pooler head. A checkpoint
    saved from a task model may prefix names with ``base_model_prefix`` (``bert.``); that prefix
    is dropped. Entries the encoder does not need are tolerated only for the pooler head and for
    buffers the model rebuilds itself (``position_ids``).
    """
    expected = model.state_dict()
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    if prefix != "." and not set(state) & set(expected):
        state = {key.removeprefix(prefix): value for key, value in state.items()}
    rebuilt = {name for name, _ in model.named_buffers()} - set(expected)
    unexpected = sorted(key for key in set(state) - set(expected)
                        if not _is_pooler(key) and key not in rebuilt)
    missing = sorted(name for name, _ in model.named_parameters()
                     if name not in state and not _is_pooler(name))
    mismatched = sorted(f"{name}: {tuple(state[name].shape)} != {tuple(tensor.shape)}"
                        for name, tensor in expected.items()
                        if name in state and state[name].shape != tensor.shape)
    problems = [f"{len(names)} {what} ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"
                for what, names in (("missing", missing), ("unexpected", unexpected),
                                    ("shape mismatches", mismatched)) if names]
    if problems:
        raise ValueError(f"weights do not fit {type(model).__name__}: {'; '.join(problems)}")
    return {name: state[name] for name in expected if name in state}


def check_weights_fit(encoder_dir: Path, state: Mapping[str, torch.Tensor]) -> None:
    """Names and shapes of the weight file against the encoder config.json describes, before
    transformers loads it (which would fill a missing weight with random values). The encoder is
    built on the meta device: no memory, no initialisation."""
    from transformers import AutoConfig, AutoModel

    try:
        config = AutoConfig.from_pretrained(str(encoder_dir), local_files_only=True)
        with torch.device("meta"):
            skeleton = AutoModel.from_config(config)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"{encoder_dir / ENCODER_CONFIG}: cannot build the encoder ({error})"
                         ) from error
    try:
        match_state_dict(skeleton, state)
    except ValueError as error:
        raise ValueError(f"{encoder_dir}: {error}") from error


def check_loaded_weights(model: nn.Module, state: Mapping[str, torch.Tensor],
                         source: Path) -> None:
    """Raise ValueError unless ``model`` holds exactly the file's values for every entry."""
    matched = match_state_dict(model, state)
    loaded = model.state_dict()
    differing = sorted(name for name, value in matched.items()
                       if not torch.equal(loaded[name].float().cpu(), value.float()))
    if differing:
        raise ValueError(f"{source}: {len(differing)} weights differ from the file after loading "
                         f"({', '.join(differing[:5])})")


class SentenceTower(nn.Module):
    """A loaded ``SentenceTransformer``; ``embed(texts)`` runs the model's whole module chain.

    It tokenizes by itself, so ``prompts.encode`` pairs it with no tokenizer.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        from sentence_transformers import SentenceTransformer

        if not isinstance(model, SentenceTransformer):
            raise ValueError(f"model must be a SentenceTransformer, got {type(model).__name__}")
        self.model = model

    @property
    def context_length(self) -> int | None:
        """Tokens per text, special tokens included; longer texts are truncated."""
        return self.model.max_seq_length

    def _warn_truncated(self, texts: Sequence[str]) -> None:
        limit = self.context_length
        if limit is None:
            return
        lengths = [len(ids) for ids in self.model.tokenizer(list(texts))["input_ids"]]
        for text, length in zip(texts, lengths, strict=True):
            if length > limit:
                log.warning("text of %d tokens is truncated to the %d-token context: %.60s...",
                            length, limit, text)

    def embed(self, texts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
        """Float32 embeddings ``[len(texts), D]`` on the CPU, in input order (normalised only if
        the chain ends in Normalize)."""
        texts = list(texts)
        self._warn_truncated(texts)
        features = self.model.encode(texts, batch_size=batch_size, convert_to_tensor=True,
                                     show_progress_bar=False)
        return features.float().cpu()


def _load_model(directory: Path, has_modules: bool, pooling_dir: Path) -> nn.Module:
    """sentence-transformers' model for the checked folder (imports it: seconds)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    try:
        if has_modules:
            return SentenceTransformer(str(directory), device="cpu", local_files_only=True,
                                       trust_remote_code=False)
        modules = [Transformer.load(str(directory), local_files_only=True),
                   Pooling.load(str(directory), subfolder=pooling_dir.name,
                                local_files_only=True)]
        return SentenceTransformer(modules=modules, device="cpu")
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as error:
        raise ValueError(f"{directory}: sentence-transformers cannot load it ({error})"
                         ) from error


def build_sentence_tower(directory: str | os.PathLike[str]) -> SentenceTower:
    """An eval-mode float32 tower from a local sentence-transformers folder, on the CPU.

    Raises FileNotFoundError for missing files and ValueError for configs or weights that do not
    fit; it never falls back to random weights and never contacts the Hugging Face hub.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: model folder not found")
    encoder_dir, pooling_dir = module_dirs(directory)
    pooling = _read_json(pooling_dir / POOLING_CONFIG)
    if not isinstance(pooling, dict):
        raise ValueError(f"{pooling_dir / POOLING_CONFIG}: expected a JSON object")
    if not any(isinstance(pooling.get(key), int) for key in POOLING_WIDTH_KEYS):
        raise ValueError(f"{pooling_dir / POOLING_CONFIG}: no {POOLING_WIDTH_KEYS[0]}")
    if not (encoder_dir / ENCODER_CONFIG).is_file():
        raise FileNotFoundError(f"{encoder_dir / ENCODER_CONFIG}: missing")
    state = read_state_dict(encoder_dir)
    check_weights_fit(encoder_dir, state)
    model = _load_model(directory, (directory / MODULES_FILE).is_file(), pooling_dir)
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    encoders = [module for module in model if isinstance(module, Transformer)]
    if len(encoders) != 1:
        raise ValueError(f"{directory}: expected one Transformer module, found {len(encoders)}")
    check_loaded_weights(encoders[0].auto_model, state, encoder_dir)
    width = encoders[0].get_embedding_dimension()
    for pooling in (module for module in model if isinstance(module, Pooling)):
        if pooling.embedding_dimension != width:
            raise ValueError(f"{pooling_dir / POOLING_CONFIG}: word_embedding_dimension "
                             f"{pooling.embedding_dimension} != the encoder's hidden size "
                             f"{width}")
    return SentenceTower(model.float()).eval()
