"""Prior bank: name-keyed rows, save/load round trip, load errors, and the released tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from datasets.labels import CLASS_NAMES, MODALITIES
from prompts.bank import (
    RELEASED_CLASS_FILE,
    RELEASED_MODALITY_FILE,
    UNKNOWN_TEXT_HASH,
    PriorBank,
    bank_from_released_tensors,
    load_prior_bank,
    load_released_priors,
    random_prior_bank,
    save_prior_bank,
)
from prompts.texts import canonical_names, text_hash

DIM = 8


def _bank(dim: int = DIM, **overrides) -> PriorBank:
    names = canonical_names()
    rows = F.normalize(torch.randn(len(names), dim, generator=torch.Generator().manual_seed(0)),
                       dim=-1)
    texts = {name: f"text of {name}" for name in names}
    fields = dict(model_id="tiny", text_hash=text_hash(texts),
                  embeddings=dict(zip(names, rows, strict=True)), texts=texts)
    return PriorBank(**{**fields, **overrides})


def _payload(bank: PriorBank) -> dict:
    return {"format_version": 1, "model_id": bank.model_id, "text_hash": bank.text_hash,
            "normalized": bank.normalized, "texts": dict(bank.texts),
            "embeddings": dict(bank.embeddings)}


def test_round_trip(tmp_path):
    bank = _bank()
    path = save_prior_bank(bank, tmp_path / "sub" / "bank.pt")
    assert sorted(p.name for p in path.parent.iterdir()) == ["bank.pt"]  # no temp file left
    loaded = load_prior_bank(path, required=canonical_names(), text_hash=bank.text_hash)
    assert (loaded.model_id, loaded.text_hash, loaded.normalized) == ("tiny", bank.text_hash, True)
    assert loaded.names == bank.names and loaded.dim == DIM
    assert dict(loaded.texts) == dict(bank.texts)
    for name in bank.names:
        assert torch.equal(loaded.embeddings[name], bank.embeddings[name])


def test_matrix_stacks_by_name():
    bank = _bank()
    names = ["class/scar", "modality/T2w", "class/background"]
    matrix = bank.matrix(names)
    assert matrix.shape == (3, DIM)
    for row, name in zip(matrix, names, strict=True):
        assert torch.equal(row, bank.embeddings[name])
    reordered = bank.matrix(names[::-1])
    assert torch.equal(reordered, matrix.flip(0))
    assert not torch.equal(reordered, matrix)


def test_modality_and_class_matrix_follow_requested_order():
    bank = _bank()
    default = bank.modality_matrix()
    for row, sequence in zip(default, MODALITIES, strict=True):
        assert torch.equal(row, bank.embeddings[f"modality/{sequence}"])
    assert torch.equal(bank.modality_matrix(["LGE", "bSSFP"]), default[[1, 0]])
    assert torch.equal(bank.class_matrix(), bank.matrix([f"class/{c}" for c in CLASS_NAMES]))
    assert torch.equal(bank.class_matrix(["edema", "scar"]), bank.class_matrix()[[3, 2]])


@pytest.mark.parametrize("names, message", [
    (["class/scar", "class/unknown"], r"no embeddings \['class/unknown'\]"),
    ([], "must not be empty"),
    ("class/scar", "not the string"),
])
def test_matrix_bad_names(names, message):
    with pytest.raises(ValueError, match=message):
        _bank().matrix(names)


def test_random_prior_bank_is_seeded_unit_rows_under_every_name():
    bank = random_prior_bank(dim=32, seed=3)
    assert bank.names == canonical_names() and bank.dim == 32
    rows = bank.matrix(bank.names)
    torch.testing.assert_close(rows.norm(dim=1), torch.ones(len(bank.names)))
    torch.testing.assert_close(random_prior_bank(dim=32, seed=3).matrix(bank.names), rows)
    assert not torch.allclose(random_prior_bank(dim=32, seed=4).matrix(bank.names), rows)


def test_bank_validation():
    bank = _bank()
    rows = dict(bank.embeddings)
    with pytest.raises(ValueError, match="non-finite"):
        _bank(embeddings={**rows, "class/scar": torch.full((DIM,), float("nan"))})
    with pytest.raises(ValueError, match="dimensions differ"):
        _bank(embeddings={**rows, "class/scar": F.normalize(torch.ones(DIM + 1), dim=0)},
              texts=None)
    with pytest.raises(ValueError, match="L2 norm"):
        _bank(embeddings={**rows, "class/scar": torch.ones(DIM)})
    assert not _bank(embeddings={**rows, "class/scar": torch.ones(DIM)},
                     normalized=False).normalized
    with pytest.raises(ValueError, match="1-D"):
        _bank(embeddings={**rows, "class/scar": torch.ones(2, DIM)})
    with pytest.raises(ValueError, match="text_hash"):
        _bank(text_hash="abc")
    with pytest.raises(ValueError, match="model_id"):
        _bank(model_id="")
    with pytest.raises(ValueError, match="texts"):
        _bank(texts={"class/scar": "x"})


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"absent\.pt.*prompts\.encode"):
        load_prior_bank(tmp_path / "absent.pt")


def test_load_not_a_bank(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_text("not a torch file")
    with pytest.raises(ValueError, match=r"junk\.pt: not a prior bank"):
        load_prior_bank(junk)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3, DIM), tensor)
    with pytest.raises(ValueError, match=r"tensor\.pt: not a prior bank"):
        load_prior_bank(tensor)


@pytest.mark.parametrize("case, message", [
    ("nan", "non-finite"),
    ("dims", "dimensions differ"),
    ("version", "format 99"),
])
def test_load_rejects_corrupt_payload(tmp_path, case, message):
    payload = _payload(_bank())
    if case == "nan":
        payload["embeddings"]["class/edema"] = torch.tensor([float("inf")] * DIM)
    elif case == "dims":
        payload["embeddings"]["class/edema"] = F.normalize(torch.ones(DIM * 2), dim=0)
    else:
        payload["format_version"] = 99
    path = tmp_path / "bad.pt"
    torch.save(payload, path)
    with pytest.raises(ValueError, match=message) as info:
        load_prior_bank(path)
    assert str(path) in str(info.value)


def test_load_required_and_hash(tmp_path):
    bank = _bank()
    path = save_prior_bank(bank, tmp_path / "bank.pt")
    with pytest.raises(ValueError, match=r"bank\.pt: prior bank lacks \['modality/PD'\]"):
        load_prior_bank(path, required=["modality/LGE", "modality/PD"])
    with pytest.raises(ValueError, match=r"bank\.pt: prior bank was encoded from other texts"):
        load_prior_bank(path, text_hash=text_hash({"class/scar": "something else"}))


def _raw(priors_dir, name):
    return torch.load(priors_dir / name, map_location="cpu", weights_only=True)


def test_released_priors_keyed_by_name(priors_dir):
    modality, classes = _raw(priors_dir, RELEASED_MODALITY_FILE), _raw(priors_dir,
                                                                        RELEASED_CLASS_FILE)
    bank = load_released_priors(priors_dir)
    assert bank.dim == 512 and bank.normalized and bank.text_hash == UNKNOWN_TEXT_HASH
    assert set(bank.names) == set(canonical_names())
    torch.testing.assert_close(bank.matrix(["modality/LGE", "modality/bSSFP", "modality/T2w"]),
                               F.normalize(modality, dim=-1))
    # MODALITIES order is bSSFP, LGE, T2w: row 0 must be the released row 1, not row 0.
    torch.testing.assert_close(bank.modality_matrix()[0], F.normalize(modality[1], dim=0))
    torch.testing.assert_close(bank.class_matrix(), F.normalize(classes, dim=-1))
    torch.testing.assert_close(bank.modality_matrix().norm(dim=-1), torch.ones(3))

    raw = load_released_priors(priors_dir, normalize=False)
    assert not raw.normalized
    assert torch.equal(raw.embeddings["modality/bSSFP"], modality[1])
    assert torch.equal(raw.embeddings["modality/LGE"], modality[0])
    assert torch.equal(raw.embeddings["class/scar"], classes[2])


def test_released_priors_round_trip(priors_dir, tmp_path):
    bank = load_released_priors(priors_dir)
    loaded = load_prior_bank(save_prior_bank(bank, tmp_path / "released.pt"))
    assert loaded.text_hash == UNKNOWN_TEXT_HASH and loaded.texts is None
    assert torch.equal(loaded.modality_matrix(), bank.modality_matrix())


def test_released_errors(tmp_path):
    with pytest.raises(FileNotFoundError,
                       match=rf"{RELEASED_MODALITY_FILE}: .*nor embedding_MRI_information"):
        load_released_priors(tmp_path)
    with pytest.raises(ValueError, match=r"modality must be a \[3, D\]"):
        bank_from_released_tensors(torch.randn(4, 16), torch.randn(4, 16))
    with pytest.raises(ValueError, match=r"classes must be a \[4, D\]"):
        bank_from_released_tensors(torch.randn(3, 16), torch.randn(3, 16))


def test_released_files_under_the_releases_own_names(priors_dir, tmp_path):
    import shutil

    shutil.copy(priors_dir / RELEASED_MODALITY_FILE, tmp_path / "embedding_MRI_information.pth")
    shutil.copy(priors_dir / "biomedclip_class_prompts.pth",
                tmp_path / "embedding_class_information.pth")
    renamed = load_released_priors(tmp_path)
    original = load_released_priors(priors_dir)
    assert torch.equal(renamed.modality_matrix(), original.modality_matrix())
