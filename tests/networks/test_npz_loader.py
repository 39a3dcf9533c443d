from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from networks import (
    TransUNetEncoder,
    backbone_config,
    create_transunet,
    export_google_weights,
    load_google_npz,
    read_npz,
    write_google_npz,
)
from networks.npz_loader import POS_EMBED_KEY, ROOT_CONV_KEY


def tiny_encoder(img_size: int = 64, in_channels: int = 3, seed: int = 0) -> TransUNetEncoder:
    torch.manual_seed(seed)
    return TransUNetEncoder.from_config(
        backbone_config("tiny", img_size=img_size), in_channels=in_channels
    ).eval()


def test_file_follows_the_google_layout(tmp_path: Path) -> None:
    weights = read_npz(write_google_npz(tiny_encoder(), tmp_path / "r50.npz"))
    block = "Transformer/encoderblock_1"
    attn = f"{block}/MultiHeadDotProductAttention_1"
    expected_shapes = {
        ROOT_CONV_KEY: (7, 7, 3, 8),
        "gn_root/scale": (8,),
        "block1/unit1/conv2/kernel": (3, 3, 8, 8),
        "block1/unit1/conv_proj/kernel": (1, 1, 8, 32),
        "block3/unit1/gn_proj/bias": (128,),
        "embedding/kernel": (1, 1, 128, 32),
        "embedding/bias": (32,),
        POS_EMBED_KEY: (1, 1 + 16, 32),  # class-token row + 4x4 grid
        "Transformer/encoder_norm/scale": (32,),
        f"{block}/LayerNorm_0/scale": (32,),
        f"{block}/LayerNorm_2/bias": (32,),
        f"{attn}/query/kernel": (32, 2, 16),
        f"{attn}/value/bias": (2, 16),
        f"{attn}/out/kernel": (2, 16, 32),
        f"{attn}/out/bias": (32,),
        f"{block}/MlpBlock_3/Dense_0/kernel": (32, 64),
        f"{block}/MlpBlock_3/Dense_1/kernel": (64, 32),
    }
    assert {k: weights[k].shape for k in expected_shapes} == expected_shapes
    # 3 root + 3 units x (3 convs + 3 GN x 2 + proj 3) + 2 embedding + 1 pos + 2 norm + 2 blocks
    # x (4 LN + 8 attention + 4 MLP) = 3 + 36 + 5 + 32.
    assert len(weights) == 76


def test_attention_layout_semantics() -> None:
    """Google's per-head kernels, applied as einsums, give what the torch modules compute."""
    encoder = tiny_encoder()
    weights = export_google_weights(encoder)
    attn_key = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1"
    attn = encoder.vit.encoder.layers[0].attention
    x = torch.randn(2, 5, 32)
    q = np.einsum("bnd,dhk->bnhk", x.numpy(), weights[f"{attn_key}/query/kernel"])
    q += weights[f"{attn_key}/query/bias"]
    torch.testing.assert_close(torch.from_numpy(q).reshape(2, 5, 32), attn.query(x))
    heads = torch.randn(2, 5, 2, 16)
    out = np.einsum("bnhk,hkd->bnd", heads.numpy(), weights[f"{attn_key}/out/kernel"])
    out += weights[f"{attn_key}/out/bias"]
    torch.testing.assert_close(torch.from_numpy(out), attn.out(heads.reshape(2, 5, 32)))


def test_round_trip_reproduces_outputs(tmp_path: Path) -> None:
    source, fresh = tiny_encoder(seed=0), tiny_encoder(seed=1)
    path = write_google_npz(source, tmp_path / "weights.npz")
    report = load_google_npz(fresh, read_npz(path))
    assert report.unused == () and report.resized_pos_embed is None
    assert report.adapted_in_channels is None
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        (f_src, s_src), (f_new, s_new) = source(x), fresh(x)
    assert torch.equal(f_src, f_new)
    assert all(torch.equal(a, b) for a, b in zip(s_src, s_new, strict=True))
    again = export_google_weights(fresh)
    assert all(np.array_equal(again[k], v) for k, v in read_npz(path).items())


def test_create_model_loads_pretrained(tmp_path: Path) -> None:
    path = write_google_npz(tiny_encoder(), tmp_path / "weights.npz")
    model = create_transunet("tiny", img_size=64, pretrained=path)
    torch.testing.assert_close(
        model.encoder.resnet.root.conv.weight, tiny_encoder().resnet.root.conv.weight,
        rtol=0, atol=0,
    )


def test_position_grid_is_resized(tmp_path: Path) -> None:
    big = tiny_encoder(img_size=224)  # 14x14 grid, as in the Google file
    with torch.no_grad():
        big.vit.embeddings.position_embeddings.fill_(0.25)
    weights = export_google_weights(big)
    assert weights[POS_EMBED_KEY].shape == (1, 197, 32)
    small = tiny_encoder(img_size=128)  # 8x8 grid
    report = load_google_npz(small, weights)
    assert report.resized_pos_embed == (14, 8)
    pos = small.vit.embeddings.position_embeddings
    assert pos.shape == (1, 64, 32)
    torch.testing.assert_close(pos, torch.full_like(pos, 0.25))


def test_position_resize_keeps_spatial_order() -> None:
    big = tiny_encoder(img_size=224)
    rows = torch.arange(14.0).repeat_interleave(14)  # token index r*14+c -> row r
    with torch.no_grad():
        big.vit.embeddings.position_embeddings.copy_(rows[None, :, None].expand(1, 196, 32))
    small = tiny_encoder(img_size=128)
    load_google_npz(small, export_google_weights(big))
    grid = small.vit.embeddings.position_embeddings[0, :, 0].reshape(8, 8)
    assert torch.all(grid[1:] > grid[:-1])  # rows increase down the grid
    torch.testing.assert_close(grid, grid[:, :1].expand(8, 8))  # constant along each row


def test_missing_key_is_named_and_nothing_is_copied() -> None:
    encoder = tiny_encoder(seed=1)
    before = {n: p.clone() for n, p in encoder.named_parameters()}
    weights = export_google_weights(tiny_encoder(seed=0))
    del weights["block2/unit1/gn3/scale"]
    del weights["Transformer/encoderblock_1/MlpBlock_3/Dense_0/bias"]
    with pytest.raises(ValueError, match="missing keys") as excinfo:
        load_google_npz(encoder, weights)
    assert "block2/unit1/gn3/scale" in str(excinfo.value)
    assert "Transformer/encoderblock_1/MlpBlock_3/Dense_0/bias" in str(excinfo.value)
    assert all(torch.equal(p, before[n]) for n, p in encoder.named_parameters())


@pytest.mark.parametrize(
    ("key", "shape"),
    [
        ("block1/unit1/conv1/kernel", (1, 1, 8, 9)),
        ("Transformer/encoderblock_0/MultiHeadDotProductAttention_1/key/kernel", (32, 32)),
        ("embedding/bias", (33,)),
        (POS_EMBED_KEY, (1, 16, 32)),  # no class-token row
        (POS_EMBED_KEY, (1, 17, 16)),
        (ROOT_CONV_KEY, (3, 3, 3, 8)),
    ],
)
def test_wrong_shape_is_named(key: str, shape: tuple[int, ...]) -> None:
    weights = export_google_weights(tiny_encoder())
    weights[key] = np.zeros(shape, dtype=np.float32)
    with pytest.raises(ValueError, match="shape mismatches") as excinfo:
        load_google_npz(tiny_encoder(), weights)
    assert key in str(excinfo.value)


def test_unused_keys_are_reported() -> None:
    weights = export_google_weights(tiny_encoder())
    weights["head/kernel"] = np.zeros((32, 1000), dtype=np.float32)
    weights["cls"] = np.zeros((1, 1, 32), dtype=np.float32)
    report = load_google_npz(tiny_encoder(), weights)
    assert report.unused == ("cls", "head/kernel")
    assert len(report.loaded) == 76


@pytest.mark.parametrize("in_channels", [1, 2, 3, 4])
def test_root_kernel_adapts_to_input_channels(in_channels: int) -> None:
    weights = export_google_weights(tiny_encoder(in_channels=3))
    encoder = tiny_encoder(in_channels=in_channels, seed=1)
    report = load_google_npz(encoder, weights)
    rgb = torch.from_numpy(weights[ROOT_CONV_KEY]).permute(3, 2, 0, 1)  # OIHW, 3 inputs
    loaded = encoder.resnet.root.conv.weight.detach()
    if in_channels == 3:
        assert report.adapted_in_channels is None
        torch.testing.assert_close(loaded, rgb, rtol=0, atol=0)
    else:
        assert report.adapted_in_channels == (3, in_channels)
        expected = rgb.sum(dim=1, keepdim=True).expand(-1, in_channels, -1, -1) / in_channels
        torch.testing.assert_close(loaded, expected)
    # The rule preserves the pre-standardisation response to a grey image on every channel.
    grey = torch.randn(1, 1, 16, 16)
    torch.testing.assert_close(
        torch.conv2d(grey.expand(1, in_channels, -1, -1), loaded, padding=3),
        torch.conv2d(grey.expand(1, 3, -1, -1), rgb, padding=3),
        rtol=1e-4, atol=1e-4,
    )


def test_read_npz_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"absent\.npz"):
        read_npz(tmp_path / "absent.npz")
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"not a zip archive")
    with pytest.raises(ValueError, match=r"broken\.npz"):
        read_npz(broken)
