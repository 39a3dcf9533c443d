"""bench.bench_training feeds its loader as train.py does: the variant's jitter by default."""

from __future__ import annotations

import json

from bench import bench_training

TINY = ["--vit_name", "tiny", "--batch_size", "2", "--img_size", "32", "--workers", "0",
        "--steps", "1", "--warmup", "0", "--loader_batches", "2", "--synthetic_slices", "4"]


def test_the_loader_jitters_at_the_variants_training_default(capsys):
    reports = {}
    for flags in (["--model", "immseg"], ["--model", "transunet"],
                  ["--model", "immseg", "--sequence_jitter", "0"]):
        assert bench_training.main([*flags, *TINY]) == 0
        reports[" ".join(flags)] = json.loads(capsys.readouterr().out)
    assert {name: report["sequence_jitter"] for name, report in reports.items()} == {
        "--model immseg": 0.5, "--model transunet": 0.0,
        "--model immseg --sequence_jitter 0": 0.0}
    for report in reports.values():
        assert report["loader"]["batches_timed"] == 2 and report["loader"]["images_per_s"] > 0
        assert report["train_step"]["steps_timed"] == 1
