"""CheckpointSegmenter: one sequence in, its myocardium probability out; refusals named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import commands.preprocess as preprocess_data
from datasets.phantom import write_phantom_dataset
from networks.variants import create_network, network_record
from preprocessing.pipeline import PreprocessConfig
from preprocessing.runner import RunOptions, run_preprocessing
from preprocessing.segmenter import CheckpointSegmenter

CPU = torch.device("cpu")


def _checkpoint(tmp_path, variant: str, dropout: float, **kwargs) -> str:
    torch.manual_seed(0)
    model = create_network(variant, backbone="tiny", img_size=32, **kwargs).eval()
    path = tmp_path / f"{variant}_{dropout}.pth"
    torch.save({"network": network_record(model), "model": model.state_dict(),
                "train_config": {"sequence_dropout": dropout}}, path)
    return str(path)


def test_one_sequence_gives_a_probability_map_of_the_stack(tmp_path):
    segmenter = CheckpointSegmenter(_checkpoint(tmp_path, "immseg_noprior", 0.5), CPU)
    stack = np.random.default_rng(0).uniform(0, 255, (3, 40, 40)).astype(np.float32)
    myocardium = segmenter(stack, "bSSFP")
    assert myocardium.shape == (3, 40, 40) and myocardium.dtype == np.float32
    assert myocardium.min() >= 0 and myocardium.max() <= 1
    # The other sequences are zeroed and masked: only the named one reaches the network.
    np.testing.assert_allclose(segmenter(stack, "bSSFP"), myocardium)
    assert not np.allclose(segmenter(stack, "T2w"), myocardium)
    assert segmenter.describe()["variant"] == "immseg_noprior"


def test_networks_that_cannot_read_one_sequence_are_refused(tmp_path):
    with pytest.raises(ValueError, match="without --sequence_dropout"):
        CheckpointSegmenter(_checkpoint(tmp_path, "immseg_noprior", 0.0), CPU)
    with pytest.raises(ValueError, match="reads one sequence only"):
        CheckpointSegmenter(_checkpoint(tmp_path, "transunet_single", 0.0, sequence="LGE"), CPU)
    segmenter = CheckpointSegmenter(_checkpoint(tmp_path, "transunet", 0.5), CPU)
    stack = np.zeros((2, 32, 32), np.float32)
    assert segmenter(stack, "T2w").shape == (2, 32, 32)
    with pytest.raises(ValueError, match="unknown sequence"):
        segmenter(stack, "T1")
    with pytest.raises(ValueError, match=r"\[D, H, W\] stack"):
        segmenter(stack[0], "T2w")


def test_preprocess_data_pairs_the_flags(tmp_path, capsys):
    base = ["--raw_root", str(tmp_path), "--out_root", str(tmp_path / "out")]
    assert preprocess_data.main([*base, "--affine_metric", "segmentation"]) == 1
    assert preprocess_data.main([*base, "--segmenter", str(tmp_path / "x.pth")]) == 1
    assert preprocess_data.main([*base, "--segmenter", str(tmp_path / "x.pth"),
                                 "--affine_metric", "segmentation", "--no_affine"]) == 1
    assert "go together" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_runner_refuses_a_missing_segmenter_before_any_case(tmp_path):
    write_phantom_dataset(tmp_path / "raw", 1)
    config = PreprocessConfig(affine_metric="segmentation", nonrigid_registration=False)
    with pytest.raises(FileNotFoundError, match=r"absent\.pth: checkpoint not found"):
        run_preprocessing(tmp_path / "raw", tmp_path / "out", config,
                          RunOptions(segmenter_checkpoint=tmp_path / "absent.pth"))
    with pytest.raises(ValueError, match="needs a segmenter checkpoint"):
        run_preprocessing(tmp_path / "raw", tmp_path / "out", config, RunOptions())
    assert not (tmp_path / "out" / "manifests").exists()


def test_runner_with_a_segmenter_in_worker_processes(tmp_path):
    write_phantom_dataset(tmp_path / "raw", 2)
    checkpoint = _checkpoint(tmp_path, "immseg_noprior", 0.5)
    config = PreprocessConfig(affine_metric="segmentation", nonrigid_registration=False)
    results = run_preprocessing(tmp_path / "raw", tmp_path / "out", config,
                                RunOptions(segmenter_checkpoint=Path(checkpoint),
                                           workers=2, qa=False))
    assert len(results) == 2 and not any(result.skipped for result in results)
    manifests = sorted((tmp_path / "out" / "manifests").glob("case*.json"))
    assert len(manifests) == 2
    for path in manifests:
        manifest = json.loads(path.read_text())
        assert manifest["affine_segmenter"]["checkpoint"] == checkpoint
        assert set(manifest["affine_registration"]) == {"bSSFP", "T2w"}
