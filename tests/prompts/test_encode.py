"""prompts.encode end to end with tiny random text towers saved to local folders (no network)."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F

from prompts.bank import load_prior_bank
from prompts.encode import TextTowerError, build_text_tower, encode_texts, main
from prompts.texts import DEFAULT_PROMPTS_PATH, canonical_names, load_prompts
from tests.prompts.tiny_models import TINY_CLIP, save_tiny_clip, save_tiny_hf_clip

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
