"""prompts.sentence_tower: folder checks, weight checks and the module chain, on tiny BERTs."""

from __future__ import annotations

import json
import logging
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from prompts.encode import encode_texts
from prompts.sentence_tower import (
    SentenceTower,
    build_sentence_tower,
    match_state_dict,
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
    """A fresh tower's BERT, as sentence-transformers loaded it."""
    directory, _ = model_dir
    return build_sentence_tower(directory).model[0].auto_model


def _write(path, config):
    path.write_text(json.dumps(config))
    return path


def _copy(model_dir, tmp_path, name="copy"):
    directory, _ = model_dir
    return shutil.copytree(directory, tmp_path / name)


def _embed(directory, texts=TEXTS):
    return encode_texts(build_sentence_tower(directory), None, texts)


def _token_states(model, directory, texts):
    """Each text alone, unpadded, through the BERT itself: ``[L, hidden]`` per text."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(str(directory))
    with torch.no_grad():
        return [model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0]
                for text in texts]


@pytest.mark.parametrize(("config", "pool"), [
    ({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}, lambda h: h.mean(0)),
    ({"pooling_mode_mean_tokens": False, "pooling_mode_cls_token": True}, lambda h: h[0]),
    ({"pooling_mode": "cls"}, lambda h: h[0]),
    ({"pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": True},
     lambda h: h.max(0).values),
])
def test_pooling_modes_follow_the_config(model_dir, tmp_path, config, pool):
    """Whatever pooling the folder names is what runs, checked against the BERT itself."""
    directory, model = model_dir
    copy = _copy(model_dir, tmp_path)
    _write(copy / "1_Pooling" / "config.json", {"word_embedding_dimension": 32, **config})
    reference = F.normalize(torch.stack([pool(h) for h in _token_states(model, directory,
                                                                          TEXTS)]), dim=-1)
    torch.testing.assert_close(_embed(copy), reference, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("config", "message"), [
    ({"word_embedding_dimension": 32, "pooling_mode": "median"}, "median"),
    ([1, 2], "JSON object"),
    ({"pooling_mode": "cls"}, "no word_embedding_dimension"),
])
def test_bad_pooling_config_is_refused(model_dir, tmp_path, config, message):
    copy = _copy(model_dir, tmp_path)
    _write(copy / "1_Pooling" / "config.json", config)
    with pytest.raises(ValueError, match=message):
        build_sentence_tower(copy)


def test_missing_pooling_config(model_dir, tmp_path):
    copy = _copy(model_dir, tmp_path)
    (copy / "1_Pooling" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"1_Pooling/config\.json: missing"):
        build_sentence_tower(copy)


def test_match_state_dict_accepts_saved_layouts(model_dir, encoder):
    _, model = model_dir
    state = model.state_dict()  # includes the pooler, which sentence pooling never uses
    matched = match_state_dict(encoder, state)
    assert set(matched) == set(encoder.state_dict())
    prefixed = {f"bert.{name}": value for name, value in state.items()}
    prefixed["bert.embeddings.position_ids"] = torch.arange(64)[None]  # older checkpoints
    assert set(match_state_dict(encoder, prefixed)) == set(matched)
    without_pooler = {k: v for k, v in state.items() if not k.startswith("pooler.")}
    assert set(match_state_dict(encoder, without_pooler)) == set(matched) - {
        "pooler.dense.weight", "pooler.dense.bias"}


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


@pytest.mark.parametrize(("change", "message"), [("drop", "1 missing"),
                                                 ("reshape", "1 shape mismatches")])
def test_a_weight_file_that_does_not_fit_is_refused(model_dir, tmp_path, change, message):
    """transformers alone would fill a missing weight with random values (and only print a
    report); the tower refuses the folder instead, naming the weight."""
    copy = _copy(model_dir, tmp_path)
    state = load_file(str(copy / "model.safetensors"))
    name = "encoder.layer.0.attention.self.query.weight"
    if change == "drop":
        del state[name]
    else:
        state[name] = state[name][:, :-1].contiguous()
    save_file(state, str(copy / "model.safetensors"))
    with pytest.raises(ValueError, match=f"{message} \\({re.escape(name)}"):
        build_sentence_tower(copy)


def test_minimal_folder_with_pickled_weights_and_only_vocab(model_dir, tmp_path):
    """pytorch_model.bin, vocab.txt, config.json, 1_Pooling (no modules.json, no tokenizer.json)
    gives the same embeddings as the full safetensors folder."""
    directory, model = model_dir
    minimal = tmp_path / "minimal"
    (minimal / "1_Pooling").mkdir(parents=True)
    for name in ("config.json", "vocab.txt", "1_Pooling/config.json"):
        (minimal / name).write_bytes((directory / name).read_bytes())
    torch.save(model.state_dict(), minimal / "pytorch_model.bin")
    torch.testing.assert_close(_embed(minimal), _embed(directory))


def test_minimal_folder_reads_its_pooling_config(model_dir, tmp_path):
    """Without modules.json, 1_Pooling/config.json still decides the pooling (sentence-
    transformers alone would fall back to mean pooling)."""
    directory, model = model_dir
    copy = _copy(model_dir, tmp_path)
    (copy / "modules.json").unlink()
    _write(copy / "1_Pooling" / "config.json", {"word_embedding_dimension": 32,
                                                "pooling_mode_cls_token": True})
    reference = F.normalize(torch.stack([h[0] for h in _token_states(model, directory, TEXTS)]),
                            dim=-1)
    torch.testing.assert_close(_embed(copy), reference, atol=1e-5, rtol=1e-4)


def test_prefixed_safetensors(model_dir, tmp_path):
    directory, model = model_dir
    copy = _copy(model_dir, tmp_path)
    save_file({f"bert.{k}": v.contiguous() for k, v in model.state_dict().items()},
              str(copy / "model.safetensors"))
    torch.testing.assert_close(_embed(copy), _embed(directory))


def test_dense_module_is_applied(model_dir, tmp_path):
    """A Dense projection in the chain runs (the embeddings are the model's own), it is not
    dropped."""
    from sentence_transformers.sentence_transformer.modules import Dense

    directory, model = model_dir
    copy = _copy(model_dir, tmp_path)
    torch.manual_seed(1)
    dense = Dense(in_features=32, out_features=8, activation_function=torch.nn.Tanh())
    (copy / "2_Dense").mkdir()
    dense.save(str(copy / "2_Dense"))
    modules = json.loads((copy / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "dense", "path": "2_Dense",
                       "type": "sentence_transformers.models.Dense"})
    _write(copy / "modules.json", modules)
    means = torch.stack([h.mean(0) for h in _token_states(model, directory, TEXTS)])
    with torch.no_grad():
        reference = F.normalize(torch.tanh(dense.linear(means)), dim=-1)
    embeddings = _embed(copy)
    assert embeddings.shape == (3, 8)
    torch.testing.assert_close(embeddings, reference, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("entry", "error", "message"), [
    ({"path": "3_Dense", "type": "sentence_transformers.models.Dense"}, FileNotFoundError,
     "3_Dense: missing"),
    ({"path": "3_Custom", "type": "my_package.Custom"}, ValueError,
     "not part of sentence-transformers"),
    ({"name": "2", "path": "", "type": "sentence_transformers.models.Normalize"}, ValueError,
     "module names repeat"),
])
def test_incomplete_or_foreign_module_chain(model_dir, tmp_path, entry, error, message):
    copy = _copy(model_dir, tmp_path)
    modules = json.loads((copy / "modules.json").read_text())
    _write(copy / "modules.json", [*modules, {"idx": 3, "name": "3", **entry}])  # may rename
    with pytest.raises(error, match=message):
        build_sentence_tower(copy)


def test_max_seq_length_is_the_context(tmp_path, caplog):
    directory = tmp_path / "short"
    save_tiny_sentence_model(directory, TEXTS, max_seq_length=8)
    tower = build_sentence_tower(directory)
    assert tower.context_length == 8
    with caplog.at_level(logging.WARNING, logger="prompts.sentence_tower"):
        embeddings = encode_texts(tower, None, [
            "scar is bright on late enhancement images", "scar is bright on late enhancement blood",
            "scar is bright on late enhancement"])
    assert "truncated to the 8-token context" in caplog.text
    assert caplog.text.count("truncated") == 2  # the third text fills the context exactly
    # [CLS] + 6 words + [SEP] = 8 tokens: the seventh word is cut, leaving the third text.
    torch.testing.assert_close(embeddings[0], embeddings[2])
    torch.testing.assert_close(embeddings[1], embeddings[2])


def test_context_defaults_to_the_position_table(model_dir):
    directory, _ = model_dir
    assert build_sentence_tower(directory).context_length == 64


def test_width_must_match_the_encoder(tmp_path):
    copy = tmp_path / "wide"
    save_tiny_sentence_model(copy, TEXTS)
    pooling = copy / "1_Pooling" / "config.json"
    _write(pooling, {**json.loads(pooling.read_text()), "word_embedding_dimension": 384})
    with pytest.raises(ValueError, match="word_embedding_dimension 384"):
        build_sentence_tower(copy)


def test_bad_arguments(encoder):
    with pytest.raises(ValueError, match="SentenceTransformer"):
        SentenceTower(encoder)
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        build_sentence_tower("/no/such/folder")
