"""Randomly initialised tiny open_clip models saved the way released ones are, for CPU tests."""

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
    words = sorted({w for text in texts for w in re.findall(r"\w+|[^\w\s]", text.lower())})
    (directory / "vocab.txt").write_text("\n".join([*SPECIAL_TOKENS, *words]) + "\n")
    BertTokenizer(str(directory / "vocab.txt")).save_pretrained(str(directory))
    BertConfig(vocab_size=len(SPECIAL_TOKENS) + len(words), hidden_size=32, num_hidden_layers=2,
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
