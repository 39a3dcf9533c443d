"""Randomly initialised tiny text models saved the way released ones are, for CPU tests."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import open_clip
import torch

#: A small ViT so the full CLIP can be built; only the text tower matters here.
TINY_VISION = {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16}
#: open_clip's own text transformer with its default BPE tokenizer (context 77).
TINY_CLIP = {"embed_dim": 32, "vision_cfg": TINY_VISION,
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2,
                          "layers": 2}}
#: The hub name BiomedCLIP's config carries; unreachable here, so it must never be fetched.
HUB_TEXT_MODEL = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _new(model_cls: type, config: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    return model_cls(**config).eval()


def save_tiny_clip(directory: Path) -> torch.nn.Module:
    """A folder like an open_clip hub repo: open_clip_config.json + open_clip_pytorch_model.bin."""
    directory.mkdir(parents=True, exist_ok=True)
    model = _new(open_clip.CLIP, TINY_CLIP)
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    torch.save(model.state_dict(), directory / "open_clip_pytorch_model.bin")
    return model


def save_tiny_hf_clip(directory: Path, texts: Iterable[str]) -> torch.nn.Module:
    """A BiomedCLIP-shaped folder: BERT text tower (config.json + tokenizer files) and a config
    whose hf_model_name points at the hub, as the released open_clip_config.json does."""
    from transformers import BertConfig, BertTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    vocab_size = _write_vocab(directory, texts)
    BertTokenizer(str(directory / "vocab.txt")).save_pretrained(str(directory))
    BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
               num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=64).save_pretrained(str(directory))
    text_cfg = {"hf_model_name": HUB_TEXT_MODEL, "hf_tokenizer_name": HUB_TEXT_MODEL,
                "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler",
                "context_length": 64}
    config = {"embed_dim": 16, "vision_cfg": TINY_VISION, "text_cfg": text_cfg}
    local = {**text_cfg, "hf_model_name": str(directory), "hf_tokenizer_name": str(directory),
             "hf_model_pretrained": False}
    model = _new(open_clip.CustomTextCLIP, {**config, "text_cfg": local})
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}))
    torch.save(model.state_dict(), directory / "open_clip_pytorch_model.bin")
    return model


def _write_vocab(directory: Path, texts: Iterable[str]) -> int:
    """A WordPiece vocab of the special tokens and every lower-cased word in ``texts``."""
    words = sorted({w for text in texts for w in re.findall(r"\w+|[^\w\s]", text.lower())})
    (directory / "vocab.txt").write_text("\n".join([*SPECIAL_TOKENS, *words]) + "\n")
    return len(SPECIAL_TOKENS) + len(words)


def save_tiny_sentence_model(directory: Path, texts: Iterable[str], pooling: str = "mean",
                             max_seq_length: int | None = None) -> torch.nn.Module:
    """A sentence-transformers folder (all-MiniLM-L6-v2's layout) holding a tiny random BERT:
    config.json, model.safetensors, tokenizer files, modules.json, 1_Pooling/config.json.

    Returns the BertModel (pooler included, as sentence-transformers checkpoints have it).
    """
    from transformers import BertConfig, BertModel, BertTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    vocab_size = _write_vocab(directory, texts)
    BertTokenizer(str(directory / "vocab.txt")).save_pretrained(str(directory))
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    model = _new(BertModel, {"config": config})
    model.save_pretrained(str(directory))
    layout = (("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize"))
    modules = [{"idx": i, "name": str(i), "path": path,
                "type": f"sentence_transformers.models.{kind}"}
               for i, (path, kind) in enumerate(layout)]
    (directory / "modules.json").write_text(json.dumps(modules))
    flags = {f"pooling_mode_{mode}": False for mode in ("cls_token", "mean_tokens", "max_tokens",
                                                         "mean_sqrt_len_tokens")}
    flags["pooling_mode_cls_token" if pooling == "cls" else "pooling_mode_mean_tokens"] = True
    (directory / "1_Pooling").mkdir(exist_ok=True)
    (directory / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32, **flags}))
    if max_seq_length is not None:
        (directory / "sentence_bert_config.json").write_text(
            json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}))
    return model
