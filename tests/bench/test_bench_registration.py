"""bench_registration on real cases: the known warp, the unwarped run and what the warp changed."""

from __future__ import annotations

import json

import pytest

from bench.bench_registration import main


@pytest.mark.slow
def test_recovery_of_a_zero_warp_is_exact(myops2020_dir, capsys):
    """Without a warp the two passes see the same images, so nothing is left to recover."""
    argv = ["--source", "real", "--real_root", str(myops2020_dir), "--case_ids", "Case3001",
            "--voxelmorph_iterations", "2", "--warp_scale", "0", "--recovery"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["recovery_mm"]) == set(report["unwarped_move_mm"]) == {"bSSFP", "T2w"}
    for name, stages in report["recovery_mm"].items():
        for stage in ("none", "affine", "affine+nonrigid"):
            assert stages[stage]["mean"] == pytest.approx(0.0, abs=1e-6)
            assert stages[stage]["pixels"] > 100
            assert report["residual_mm"][name][stage]["mean"] == pytest.approx(
                report["unwarped_move_mm"][name][stage]["mean"], abs=1e-6)
        # The registration does move pre-aligned slices: the unwarped run is not trivial.
        assert report["unwarped_move_mm"][name]["affine"]["mean"] > 0.05


def test_recovery_needs_real_cases(capsys):
    with pytest.raises(SystemExit):
        main(["--source", "phantom", "--recovery"])
    assert "--recovery" in capsys.readouterr().err
