"""prompts.sentence_tower: pooling configs, weight checks and folder variants, on tiny BERTs."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from safetensors.torch import save_file

from prompts.encode import encode_texts
from prompts.sentence_tower import (
    SentenceTokenizer,
    SentenceTower,
    build_sentence_tower,
    match_state_dict,
    read_pooling,
)
from tests.prompts.tiny_models import save_tiny_sentence_model

TEXTS = ["scar is bright on late enhancement", "edema is bright on T2-weighted images",
         "the blood pool is dark"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_sbert")
    return directory, save_tiny_sentence_model(directory, TEXTS)


@pytest.fixture()
def encoder(model_dir):
    """A fresh tower's BERT (pooler dropped), as build_sentence_tower makes it."""
    directory, _ = model_dir
    return build_sentence_tower(directory)[0].encoder


def _write(path, config):
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(("config", "mode"), [
    ({"word_embedding_dimension": 8, "pooling_mode_mean_tokens": True,
      "pooling_mode_cls_token": False, "pooling_mode_max_tokens": False}, "mean"),
    ({"pooling_mode_mean_tokens": False, "pooling_mode_cls_token": True}, "cls"),
    ({"pooling_mode": "cls"}, "cls"),
])
def test_read_pooling(tmp_path, config, mode):
    assert read_pooling(_write(tmp_path / "config.json", config)) == (
        mode, config.get("word_embedding_dimension"))


@pytest.mark.parametrize("config", [
    {"pooling_mode_max_tokens": True},
    {"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": True},
    {"pooling_mode_mean_tokens": False},
    {"pooling_mode": "lasttoken"},
    [1, 2],
])
def test_read_pooling_refuses_what_it_cannot_reproduce(tmp_path, config):
    with pytest.raises(ValueError, match=r"not supported|JSON object"):
        read_pooling(_write(tmp_path / "config.json", config))


def test_read_pooling_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        read_pooling(tmp_path / "config.json")


def test_match_state_dict_accepts_saved_layouts(model_dir, encoder):
    _, model = model_dir
    state = model.state_dict()  # includes the pooler, which the tower drops
    matched = match_state_dict(encoder, state)
    assert set(matched) == set(encoder.state_dict())
    prefixed = {f"bert.{name}": value for name, value in state.items()}
    prefixed["bert.embeddings.position_ids"] = torch.arange(64)[None]  # older checkpoints
    assert set(match_state_dict(encoder, prefixed)) == set(matched)


@pytest.mark.parametrize(("change", "message"), [
    ("drop", "1 missing"), ("reshape", "1 shape mismatches"), ("extra", "1 unexpected")])
def test_match_state_dict_checks_every_name_and_shape(model_dir, encoder, change, message):
    _, model = model_dir
    state = dict(model.state_dict())
    name = "encoder.layer.0.attention.self.query.weight"
    if change == "drop":
        del state[name]
    elif change == "reshape":
        state[name] = state[name][:, :-1]
    else:
        name = "classifier.weight"
        state[name] = torch.zeros(2, 32)
    with pytest.raises(ValueError, match=f"fit BertModel: {message} \\({re.escape(name)}"):
        match_state_dict(encoder, state)


def test_minimal_folder_with_pickled_weights_and_only_vocab(model_dir, tmp_path):
    """pytorch_model.bin, vocab.txt, config.json, 1_Pooling (no modules.json, no tokenizer.json)
    gives the same embeddings as the full safetensors folder."""
    directory, model = model_dir
    minimal = tmp_path / "minimal"
    (minimal / "1_Pooling").mkdir(parents=True)
    for name in ("config.json", "vocab.txt", "1_Pooling/config.json"):
        (minimal / name).write_bytes((directory / name).read_bytes())
    torch.save(model.state_dict(), minimal / "pytorch_model.bin")
    torch.testing.assert_close(encode_texts(*build_sentence_tower(minimal), TEXTS),
                               encode_texts(*build_sentence_tower(directory), TEXTS))


def test_prefixed_safetensors(model_dir, tmp_path):
    directory, model = model_dir
    copy = tmp_path / "prefixed"
    copy.mkdir()
    for path in directory.rglob("*"):
        if path.is_file() and path.name != "model.safetensors":
            (copy / path.relative_to(directory)).parent.mkdir(parents=True, exist_ok=True)
            (copy / path.relative_to(directory)).write_bytes(path.read_bytes())
    save_file({f"bert.{k}": v.contiguous() for k, v in model.state_dict().items()},
              str(copy / "model.safetensors"))
    torch.testing.assert_close(encode_texts(*build_sentence_tower(copy), TEXTS),
                               encode_texts(*build_sentence_tower(directory), TEXTS))


def test_max_seq_length_is_the_context(tmp_path, caplog):
    directory = tmp_path / "short"
    save_tiny_sentence_model(directory, TEXTS, max_seq_length=8)
    tower, tokenizer = build_sentence_tower(directory)
    assert tokenizer.context_length == 8 and not tokenizer.lowercase
    assert tokenizer(TEXTS).shape == (3, 8)
    with caplog.at_level(logging.WARNING, logger="prompts.encode"):
        encode_texts(tower, tokenizer, TEXTS)
    assert "may be truncated" in caplog.text


def test_context_defaults_to_the_position_table(model_dir):
    directory, _ = model_dir
    _, tokenizer = build_sentence_tower(directory)
    assert tokenizer.context_length == 64 and tokenizer(TEXTS[:1]).dtype == torch.long


def test_width_must_match_the_encoder(tmp_path):
    copy = tmp_path / "wide"
    save_tiny_sentence_model(copy, TEXTS)
    pooling = copy / "1_Pooling" / "config.json"
    _write(pooling, {**json.loads(pooling.read_text()), "word_embedding_dimension": 384})
    with pytest.raises(ValueError, match="word_embedding_dimension 384"):
        build_sentence_tower(copy)


def test_bad_arguments(model_dir, encoder):
    directory, _ = model_dir
    _, tokenizer = build_sentence_tower(directory)
    with pytest.raises(ValueError, match="pooling"):
        SentenceTower(encoder, "max", 0)
    with pytest.raises(ValueError, match="pad_id"):
        SentenceTower(encoder, "mean", -1)
    with pytest.raises(ValueError, match="context_length"):
        SentenceTokenizer(tokenizer.tokenizer, 1)
    with pytest.raises(ValueError, match="long tensor"):
        SentenceTower(encoder, "mean", 0).encode_text(torch.zeros(2, 4))
