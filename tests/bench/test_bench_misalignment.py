"""The misalignment bench: known resampling and warps, and one label-free run on a real case."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import bench_misalignment as bench
from datasets.raw import Volume
from networks.variants import create_network, network_record


def _volume(spacing: float = 0.5) -> Volume:
    rng = np.random.default_rng(0)
    array = np.zeros((2, 40, 60), np.float32)
    array[:, 10:30, 20:40] = 100 + rng.normal(0, 1, (2, 20, 20))
    affine = np.diag([spacing, spacing, 10.0, 1.0])
    return Volume(array, affine, Path("mem"))


def _shift(dx_mm: float, dy_mm: float) -> dict:
    return {"centre_mm": [0.0, 0.0], "rotation_deg": 0.0, "translation_mm": [dx_mm, dy_mm],
            "scale": 1.0, "nonrigid": {"origin_mm": [0.0, 0.0], "spacing_mm": 10.0,
                                       "coefficients_mm": np.zeros((2, 4, 4)).tolist()}}


def test_resampling_alone_keeps_the_field_of_view_and_a_shift_moves_by_its_mm():
    volume = _volume()
    same = bench.moved_volume(volume, 0.5, None)
    np.testing.assert_allclose(same.array, volume.array, atol=1e-3)
    np.testing.assert_allclose(same.affine, volume.affine)
    coarse = bench.moved_volume(volume, 1.0, None)
    assert coarse.array.shape == (2, 20, 30) and coarse.spacing == pytest.approx((10, 1, 1))
    # The output at p shows the input at W(p) = p + (2 mm, 1 mm): 4 and 2 pixels of 0.5 mm.
    moved = bench.moved_volume(volume, 0.5, [_shift(2.0, 1.0)] * 2)
    np.testing.assert_allclose(moved.array[:, 10:28, 20:36], volume.array[:, 12:30, 24:40],
                               atol=1e-3)


def test_unknown_metrics_or_poolings_stop_before_any_work(tmp_path):
    for flag, value in (("--metrics", "ngf,sift"), ("--pooling", "mean")):
        with pytest.raises(ValueError, match=f"{flag}: unknown"):
            bench.run(bench.build_parser().parse_args(
                ["--checkpoint", str(tmp_path / "absent.pth"), flag, value]))


def _tiny_checkpoint_and_case(myops2020_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A random tiny network's checkpoint and a raw folder holding the real Case3001."""
    torch.manual_seed(0)
    model = create_network("transunet", backbone="tiny", img_size=128).eval()
    checkpoint = tmp_path / "model.pth"
    torch.save({"network": network_record(model), "model": model.state_dict(),
                "train_config": {"root_path": str(tmp_path)}}, checkpoint)
    raw = tmp_path / "raw" / "Case3001"
    raw.mkdir(parents=True)
    for path in (myops2020_dir / "Case3001").iterdir():
        (raw / path.name).symlink_to(path)
    return checkpoint, raw.parent


def test_one_real_case_under_every_condition(myops2020_dir, tmp_path, capsys, monkeypatch):
    import prediction.pipeline as pipeline

    calls = []
    real_register = pipeline.register_sequences

    def counted(stacks, fixed, guide, *args, **kwargs):
        calls.append(guide.copy())
        return real_register(stacks, fixed, guide, *args, **kwargs)

    monkeypatch.setattr(pipeline, "register_sequences", counted)
    checkpoint, raw_root = _tiny_checkpoint_and_case(myops2020_dir, tmp_path)
    assert bench.main(["--checkpoint", str(checkpoint), "--raw_root", str(raw_root),
                       "--per", "slice", "--threads", "1", "--rounds", "2",
                       "--pooling", "stack", "--metrics", "ngf"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cases"] == 1
    registered = ["misaligned + affine", "misaligned + affine, ngf metric",
                  "misaligned + affine, stack pooling",
                  "misaligned + affine, 2 rounds"]
    assert list(report["dice_percent"]) == ["aligned", "misaligned", *registered]
    # One registration per affine condition, two (register, predict, register) for rounds.
    assert len(calls) == 5
    # Every registered condition fits each slice of bSSFP and of T2w once (the last round's).
    assert list(report["affine_fits"]) == registered
    slices = {counts["slices"] for counts in report["affine_fits"].values()}
    assert len(slices) == 1 and slices.pop() % 2 == 0
    assert all(0 <= c["identity"] <= c["slices"] for c in report["affine_fits"].values())
    for row in report["dice_percent"].values():
        assert set(row) == {"myocardium", "scar", "edema alone", "scar+edema",
                            "whole myocardium"}


def test_a_cached_run_reports_what_it_measured_without_predicting_again(
        myops2020_dir, tmp_path, capsys, monkeypatch):
    checkpoint, raw_root = _tiny_checkpoint_and_case(myops2020_dir, tmp_path)
    cache = tmp_path / "cache"
    argv = ["--checkpoint", str(checkpoint), "--raw_root", str(raw_root), "--threads", "1",
            "--cache", str(cache)]
    assert bench.main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert sorted(path.name for path in cache.iterdir()) == ["0_Case3001.npz",
                                                             "fingerprint.json"]

    def no_prediction(*args, **kwargs):
        raise AssertionError("a kept case was predicted again")

    monkeypatch.setattr(bench, "predict_patient", no_prediction)
    assert bench.main(argv) == 0
    assert json.loads(capsys.readouterr().out) == first
    # Another measurement is refused, not mixed with the kept one; the cache stays as it was.
    kept = (cache / "0_Case3001.npz").read_bytes()
    assert bench.main([*argv, "--strength", "0.5"]) == 1
    assert "differs in strength" in capsys.readouterr().err
    assert (cache / "0_Case3001.npz").read_bytes() == kept
