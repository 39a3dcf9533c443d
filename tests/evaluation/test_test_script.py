"""test.py flags: --tta, --sequences, --all_subsets, --save_nifti, and its error handling.

The checkpoint is written here from a tiny random network (what test.py needs from it: the
network record, the weights and the data root), so these tests do not depend on training.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch

import commands.test as test_script
from datasets.labels import EVAL_GROUPS, MODALITIES
from datasets.processed import ProcessedLayout
from evaluation.evaluate import all_subsets, evaluate, subset_label
from networks.variants import create_network, network_record
from tests.helpers import random_bank, write_ring_dataset

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_ring_dataset(tmp_path_factory.mktemp("processed"), train_cases=0,
                              slices_per_case=2, test_cases=("case0005", "case0010"))


def _checkpoint(variant: str, root, folder) -> tuple[torch.nn.Module, str]:
    torch.manual_seed(0)
    model = create_network(variant, backbone="tiny", img_size=32,
                           priors=random_bank() if variant == "immseg" else None).eval()
    path = folder / "checkpoint_final.pth"
    torch.save({"network": network_record(model), "model": model.state_dict(),
                "train_config": {"root_path": str(root)}}, path)
    return model, str(path)


def test_tta_and_a_sequence_subset(root, tmp_path, capsys):
    model, checkpoint = _checkpoint("transunet", root, tmp_path)
    out = tmp_path / "out"
    assert test_script.main(["--checkpoint", checkpoint, "--device", "cpu", "--tta",
                             "--sequences", "t2w,LGE", "--save_nifti",
                             "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "sequences: LGE+T2w" in printed and "flip TTA" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["sequences"] == ["LGE", "T2w"] and summary["settings"]["tta"]
    # The files hold what evaluate() computes with the same settings.
    expected = evaluate(model, ProcessedLayout(root), ["case0005", "case0010"], 32, CPU,
                        tta=True, sequences=("LGE", "T2w"))
    assert summary["cases"] == expected.grid.per_case()
    with open(out / "per_case.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["case"] for row in rows] == ["case0005", "case0010"]
    assert float(rows[0]["scar_dice"]) == pytest.approx(expected.grid.per_case()[0]["scar_dice"])
    assert (out / "dice_boxplot.png").stat().st_size > 0
    written = {p.name for p in (out / "predictions").iterdir()}
    assert written == {f"{case}_{suffix}.nii.gz" for case in ("case0005", "case0010")
                       for suffix in ("pred", "gt", *MODALITIES)}


def test_all_subsets_writes_one_folder_per_subset_and_a_table(root, tmp_path, capsys):
    _, checkpoint = _checkpoint("immseg", root, tmp_path)
    out = tmp_path / "subsets"
    assert test_script.main(["--checkpoint", checkpoint, "--device", "cpu", "--all_subsets",
                             "--save_nifti", "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    labels = [subset_label(subset) for subset in all_subsets()]
    for label in labels:
        assert label in printed
        summary = json.loads((out / label / "summary.json").read_text())
        assert summary["settings"]["sequences"] == label.split("+")
        assert (out / label / "dice_boxplot.png").is_file()
        # Each subset writes its predictions; the label and inputs are written once.
        assert {p.name for p in (out / label / "predictions").iterdir()} == {
            "case0005_pred.nii.gz", "case0010_pred.nii.gz"}
    assert {p.name for p in (out / "reference").iterdir()} == {
        f"{case}_{suffix}.nii.gz" for case in ("case0005", "case0010")
        for suffix in ("gt", *MODALITIES)}
    with open(out / "subsets.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["subset"] for row in rows] == labels
    full = json.loads((out / "bSSFP+LGE+T2w" / "summary.json").read_text())["summary"]
    for group in EVAL_GROUPS:
        assert float(rows[-1][f"{group}_dice_mean"]) == pytest.approx(
            full[group]["dice"]["mean"])
    table = json.loads((out / "subsets.json").read_text())
    assert [entry["subset"] for entry in table["subsets"]] == labels
    assert table["subsets"][-1]["summary"] == full


def test_bad_input_exits_1_with_a_message(root, tmp_path, capsys):
    _, checkpoint = _checkpoint("transunet", root, tmp_path)

    def error_of(argv: list[str]) -> str:
        assert test_script.main(argv) == 1
        return capsys.readouterr().err

    base = ["--checkpoint", checkpoint, "--device", "cpu", "--output_dir", str(tmp_path / "o")]
    assert "unknown sequence(s) ['T1']" in error_of([*base, "--sequences", "LGE,T1"])
    assert "at least one sequence" in error_of([*base, "--sequences", ","])
    assert "named twice" in error_of([*base, "--sequences", "LGE,lge"])
    missing = tmp_path / "absent.pth"
    message = error_of(["--checkpoint", str(missing), "--device", "cpu"])
    assert str(missing) in message and "checkpoint not found" in message
    assert "batch_size" in error_of([*base, "--batch_size", "0"])
    # A checkpoint with NaN weights is refused, not scored.
    payload = torch.load(checkpoint, weights_only=False)
    key = next(k for k, v in payload["model"].items() if v.is_floating_point())
    payload["model"][key] = torch.full_like(payload["model"][key], float("nan"))
    broken = tmp_path / "nan.pth"
    torch.save(payload, broken)
    assert f"{broken}: 1 weight tensor(s) hold NaN/Inf ({key}" in error_of(
        ["--checkpoint", str(broken), "--device", "cpu"])
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):  # argparse: the two ways of choosing sequences conflict
        test_script.main([*base, "--sequences", "LGE", "--all_subsets"])
