"""bench_registration on real cases: the known warp, the unwarped run and what the warp changed."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
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


@pytest.mark.slow
def test_same_contrast_control_undoes_a_known_warp_of_real_images(myops2020_dir, capsys):
    """Registering warped copies of the LGE onto the LGE: the pipeline itself (resampling,
    masks, fits, field composition, error bookkeeping) must then land well under a millimetre
    on real slices, so the cross-contrast metric alone is what the real test measures."""
    argv = ["--source", "real", "--real_root", str(myops2020_dir), "--case_ids",
            "Case3001,Case3002", "--voxelmorph_iterations", "2", "--affine_metric", "ngf",
            "--same_contrast"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["same_contrast"] is True
    for stages in report["residual_mm"].values():
        assert stages["none"]["mean"] > 2.0
        assert stages["affine"]["mean"] < 0.5
        assert stages["affine"]["p95"] < 1.0


@pytest.mark.parametrize("flag", ["--recovery", "--same_contrast"])
def test_real_only_options_refuse_the_phantom(flag, capsys):
    with pytest.raises(SystemExit):
        main(["--source", "phantom", flag])
    assert flag in capsys.readouterr().err


def test_bad_input_exits_1_naming_the_problem(myops2020_dir, tmp_path, capsys):
    assert main(["--cases", "0"]) == 1
    assert main(["--source", "real", "--real_root", str(myops2020_dir),
                 "--case_ids", "Case9999"]) == 1
    assert "Case9999" in capsys.readouterr().err
    # A bSSFP volume off the LGE's grid cannot stand in for it in the control.
    root = tmp_path / "real"
    shutil.copytree(myops2020_dir / "Case3001", root / "Case3001")
    path = root / "Case3001" / "Case3001_C0.nii.gz"
    image = nib.load(str(path))
    moved = image.affine.copy()
    moved[:3, 3] += 2.0
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), moved, image.header), str(path))
    assert main(["--source", "real", "--real_root", str(root), "--cases", "1",
                 "--same_contrast"]) == 1
    error = capsys.readouterr().err
    assert "Case3001_C0.nii.gz" in error and "grid" in error
