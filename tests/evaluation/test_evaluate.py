"""Held-out evaluation: sequence subsets, NIfTI files that overlay, result files and figures."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from datasets.labels import EVAL_GROUPS, MODALITIES
from datasets.processed import ProcessedLayout, write_test_volume
from evaluation.evaluate import (
    Scores,
    all_subsets,
    evaluate,
    evaluate_subsets,
    format_subset_table,
    subset_label,
    write_results,
    write_subset_table,
)
from evaluation.metrics import MetricAccumulator, group_scores
from evaluation.plots import dice_boxplot, dice_by_group
from networks.inference import predict_volume
from networks.variants import create_network

CPU = torch.device("cpu")
SPACING = (8.0, 1.5, 0.75)  # slice, row, column: all different, so a swapped axis shows


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """Two test volumes of 3 slices, 20 rows x 28 columns (non-square, anisotropic)."""
    root = tmp_path_factory.mktemp("processed")
    layout = ProcessedLayout(root)
    rng = np.random.default_rng(0)
    for name in ("case0101", "case0102"):
        label = np.zeros((3, 20, 28), np.uint8)
        label[:, 5:12, 6:20] = 1
        label[1, 7:10, 8:12] = 2
        label[:, 9:11, 15:19] = 3
        for channel, sequence in enumerate(MODALITIES):
            image = rng.uniform(0, 255, label.shape) + 60 * channel * (label > 0)
            write_test_volume(layout.item_path(sequence, "test_vol", name), image, label,
                              SPACING)
    return layout


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_network("transunet", backbone="tiny", img_size=32).eval()


def test_all_subsets_lists_the_seven_non_empty_subsets():
    subsets = all_subsets()
    assert len(subsets) == 7 and len(set(subsets)) == 7
    assert subsets[0] == ("bSSFP",) and subsets[-1] == MODALITIES
    assert subset_label(("LGE", "T2w")) == "LGE+T2w"


def test_nifti_files_share_one_geometry_and_round_trip(layout, model, tmp_path):
    present = ("LGE", "T2w")
    metrics = evaluate(model, layout, ["case0101"], 32, CPU, batch_size=2, tta=True,
                       sequences=present, prediction_dir=tmp_path)
    image, label, spacing = layout.read_volume("case0101")
    expected = predict_volume(model, image, 32, CPU, tta=True, sequences=present)

    loaded = {suffix: nib.load(str(tmp_path / f"case0101_{suffix}.nii.gz"))
              for suffix in ("pred", "gt", *MODALITIES)}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"case0101_{suffix}.nii.gz" for suffix in loaded)
    reference = loaded["pred"]
    np.testing.assert_array_equal(reference.affine, np.diag([0.75, 1.5, 8.0, 1.0]))
    for suffix, nifti in loaded.items():
        assert nifti.shape == (28, 20, 3), suffix  # stored x (columns), y (rows), z (slices)
        np.testing.assert_array_equal(nifti.affine, reference.affine)
        np.testing.assert_array_equal(nifti.get_qform(), reference.get_sform())
        assert nifti.header.get_zooms() == (0.75, 1.5, 8.0)
        assert int(nifti.header["qform_code"]) == int(nifti.header["sform_code"]) == 1

    prediction = np.asarray(reference.dataobj).transpose(2, 1, 0)
    assert prediction.dtype == np.uint8
    np.testing.assert_array_equal(prediction, expected)
    np.testing.assert_array_equal(np.asarray(loaded["gt"].dataobj).transpose(2, 1, 0), label)
    for index, sequence in enumerate(MODALITIES):  # absent sequences are written as stored
        np.testing.assert_array_equal(
            np.asarray(loaded[sequence].dataobj).transpose(2, 1, 0), image[:, index])
    scores = group_scores(expected, label, spacing)
    (row,) = metrics.grid.per_case()
    assert row == {"case": "case0101", **{
        f"{group}_{metric}": value for group, values in scores.items()
        for metric, value in values.items()}} | {
        key: value for key, value in row.items() if "_ml_" in key}
    voxel_ml = 8.0 * 1.5 * 0.75 / 1000
    assert row["scar_ml_label"] == pytest.approx(np.count_nonzero(label == 2) * voxel_ml)
    assert row["whole myocardium_ml_pred"] == pytest.approx(
        np.count_nonzero(expected > 0) * voxel_ml)


def test_subsets_read_once_and_match_single_subset_runs(layout, model):
    names = layout.names("test_vol")
    subsets = [("LGE",), MODALITIES]
    results = evaluate_subsets(model, layout, names, 32, CPU, subsets)
    assert list(results) == subsets
    for subset in subsets:
        alone = evaluate(model, layout, names, 32, CPU, sequences=subset)
        assert results[subset].grid.per_case() == alone.grid.per_case()
    assert (evaluate(model, layout, names, 32, CPU).grid.per_case()
            == results[MODALITIES].grid.per_case())
    with pytest.raises(ValueError, match="listed twice"):
        evaluate_subsets(model, layout, names, 32, CPU, [("LGE",), ("lge",)])
    with pytest.raises(ValueError, match="at least one"):
        evaluate_subsets(model, layout, names, 32, CPU, [])
    with pytest.raises(ValueError, match="unknown sequence"):
        evaluate(model, layout, names, 32, CPU, sequences=["T1"])


def _known_scores() -> Scores:
    """Two cases with hand-checkable myocardium Dice: 1.0 (identical) and 2*2/(4+2) = 2/3."""
    metrics = MetricAccumulator({"myocardium": (1,), "scar": (2,)})
    gt = np.zeros((1, 4, 4), np.uint8)
    gt[0, 0, :4] = 1
    metrics.update("a", gt.copy(), gt, (1.0, 1.0, 1.0))
    pred = np.zeros_like(gt)
    pred[0, 0, :2] = 1
    metrics.update("b", pred, gt, (1.0, 1.0, 1.0))
    return Scores(grid=metrics, native=MetricAccumulator(metrics.groups))


def test_results_and_subset_table_hold_known_values(tmp_path):
    metrics = _known_scores()
    assert dice_by_group(metrics.grid) == {"myocardium": [1.0, pytest.approx(2 / 3)],
                                      "scar": [1.0, 1.0]}
    write_results(tmp_path / "one", metrics, {"tta": True, "sequences": ["LGE"]})
    summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert summary["settings"] == {"tta": True, "sequences": ["LGE"]}
    assert summary["summary"]["myocardium"]["dice"]["mean"] == pytest.approx(5 / 6)
    assert [row["case"] for row in summary["cases"]] == ["a", "b"]
    assert (tmp_path / "one" / "per_case.csv").read_text().startswith("case,myocardium_dice")
    assert (tmp_path / "one" / "dice_boxplot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    results = {("LGE",): metrics, MODALITIES: _known_scores()}
    write_subset_table(tmp_path, results, {"tta": False})
    with open(tmp_path / "subsets.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["subset"] for row in rows] == ["LGE", "bSSFP+LGE+T2w"]
    assert float(rows[0]["myocardium_dice_mean"]) == pytest.approx(5 / 6)
    assert float(rows[0]["myocardium_dice_std"]) == pytest.approx(1 / 6)
    assert rows[0]["n"] == "2"
    table = json.loads((tmp_path / "subsets.json").read_text())
    assert table["subsets"][0]["sequences"] == ["LGE"]
    assert table["subsets"][0]["summary"]["scar"]["dice"]["mean"] == 1.0
    printed = format_subset_table(results)
    assert "LGE" in printed and "83.33" in printed and "100.00" in printed
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temporaries


def test_boxplot_rejects_bad_values(tmp_path):
    path = tmp_path / "plot.png"
    with pytest.raises(ValueError, match="at least one group"):
        dice_boxplot({}, path)
    with pytest.raises(ValueError, match="non-empty"):
        dice_boxplot({"scar": []}, path)
    with pytest.raises(ValueError, match="outside"):
        dice_boxplot({"scar": [0.5, 1.5]}, path)
    with pytest.raises(ValueError, match="no cases"):
        dice_by_group(MetricAccumulator())
    assert not path.exists()
    dice_boxplot({group: [0.2, 0.9, 0.5] for group in EVAL_GROUPS}, path, title="t")
    assert path.stat().st_size > 1000
