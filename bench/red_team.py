"""Bad inputs and faults against the five commands: does each end in one clear error?

    python -m bench.red_team [--json out.json]

Builds a small workspace (phantom cases, their processed layout, a tiny trained checkpoint), then
runs every scenario in-process and prints one row each: the exit code, the first line of the
error, whether that message names the offending file, and whether every file the user already had
(inputs, finished runs, earlier outputs) is byte-for-byte unchanged. The aim is every row: a
non-zero exit, the file named, nothing lost. Exit status 1 when a row misses it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np

import predict
import preprocess_data
import test as test_script
import train as train_script
from datasets.phantom import write_phantom_dataset
from evaluation import score_folder
from networks.checkpoint import CHECKPOINT_FINAL
from preprocessing.pipeline import PreprocessConfig
from preprocessing.runner import RunOptions, run_preprocessing

COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "preprocess_data": preprocess_data.main, "train": train_script.main,
    "test": test_script.main, "predict": predict.main, "score_folder": score_folder.main}


@dataclass
class Scenario:
    name: str
    command: str
    argv: Callable[[Path], list[str]]
    #: makes the bad input in a copy of the workspace
    setup: Callable[[Path], None] = lambda ws: None
    #: text the message must contain (usually the offending path), relative to the workspace
    names: Callable[[Path], str] | None = None
    #: files that must not change (relative to the workspace)
    protect: tuple[str, ...] = ()
    expect_code: tuple[int, ...] = (1, 2)


@dataclass
class Outcome:
    name: str
    command: str
    code: int
    message: str
    names_file: bool | None
    intact: bool
    ok: bool = field(init=False)

    def __post_init__(self) -> None:
        self.ok = self.code != 0 and self.names_file is not False and self.intact


def _nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> None:
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))


def _modify(path: Path, change: Callable[[np.ndarray], np.ndarray],
            affine: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
    image = nib.load(str(path))
    data = change(np.asanyarray(image.dataobj).copy())
    _nifti(path, data, image.affine if affine is None else affine(image.affine))


def _sagittal(affine: np.ndarray) -> np.ndarray:
    turned = np.eye(4)
    turned[:3, :3] = [[0, 0, 1], [1, 0, 0], [0, 1, 0]]
    return turned @ affine


RAW = "raw/Raw_data"
CASE = "case0001"
PROCESSED = "processed"
RUN = "run"


def _raw(ws: Path, sequence: str) -> Path:
    folder = {"bSSFP": "bSSFP", "LGE": "LGE", "T2w": "T2w", "label": "label"}[sequence]
    suffix = "_gt" if sequence == "label" else ""
    return ws / RAW / folder / f"{CASE}{suffix}.nii.gz"


def _slice(ws: Path, sequence: str = "LGE") -> Path:
    """A slice the training list names."""
    name = (ws / PROCESSED / "lists" / "train.txt").read_text().split()[0]
    return ws / PROCESSED / sequence / "train_npz" / f"{name}.npz"


def _one_voxel(value: int) -> Callable[[np.ndarray], np.ndarray]:
    def change(array: np.ndarray) -> np.ndarray:
        array[0, 0, 0] = value
        return array
    return change


def _train_args(ws: Path, out: str = "newrun") -> list[str]:
    return ["--model", "transunet", "--vit_name", "tiny", "--root_path", str(ws / PROCESSED),
            "--img_size", "32", "--batch_size", "4", "--max_epochs", "1", "--num_workers", "0",
            "--val_every", "0", "--val_fraction", "0", "--device", "cpu",
            "--output_dir", str(ws / out)]


def _checkpoint(ws: Path) -> str:
    return str(ws / RUN / CHECKPOINT_FINAL)


def _predict_args(ws: Path, out: str) -> list[str]:
    return ["--checkpoint", _checkpoint(ws), "--device", "cpu", "--bssfp", str(_raw(ws, "bSSFP")),
            "--lge", str(_raw(ws, "LGE")), "--t2w", str(_raw(ws, "T2w")), "--out", out]


def scenarios() -> list[Scenario]:
    raw_inputs = tuple(f"{RAW}/{folder}/{CASE}{suffix}.nii.gz" for folder, suffix in (
        ("bSSFP", ""), ("LGE", ""), ("T2w", ""), ("label", "_gt")))
    prep = lambda ws, *extra: ["--raw_root", str(ws / "raw"), "--out_root",  # noqa: E731
                               str(ws / "out"), "--no_affine", "--no_nonrigid", "--no_qa",
                               *extra]
    return [
        Scenario("raw root missing", "preprocess_data",
                 lambda ws: ["--raw_root", str(ws / "absent")], names=lambda ws: "absent"),
        Scenario("0-byte NIfTI", "preprocess_data", prep,
                 lambda ws: _raw(ws, "T2w").write_bytes(b""),
                 names=lambda ws: str(_raw(ws, "T2w"))),
        Scenario("NaN voxels", "preprocess_data", prep,
                 lambda ws: _modify(_raw(ws, "LGE"), lambda a: np.where(a > 0, np.nan, a)),
                 names=lambda ws: str(_raw(ws, "LGE"))),
        Scenario("4D volume", "preprocess_data", prep,
                 lambda ws: _modify(_raw(ws, "bSSFP"), lambda a: np.stack([a, a], -1)),
                 names=lambda ws: str(_raw(ws, "bSSFP"))),
        Scenario("unknown label value", "preprocess_data", prep,
                 lambda ws: _modify(_raw(ws, "label"), _one_voxel(7)),
                 names=lambda ws: str(_raw(ws, "label"))),
        Scenario("sagittal T2w stack", "preprocess_data", prep,
                 lambda ws: _modify(_raw(ws, "T2w"), lambda a: a, _sagittal),
                 names=lambda ws: str(_raw(ws, "T2w"))),
        Scenario("label on no sequence's grid", "preprocess_data", prep,
                 lambda ws: _modify(_raw(ws, "label"), lambda a: a[:-3]),
                 names=lambda ws: str(_raw(ws, "label"))),
        Scenario("case lacks a sequence", "preprocess_data", prep,
                 lambda ws: _raw(ws, "T2w").unlink(), names=lambda ws: CASE),
        Scenario("out_root is a file", "preprocess_data", prep,
                 lambda ws: (ws / "out").write_text("x"), names=lambda ws: str(ws / "out"),
                 protect=("out",)),
        Scenario("max_slice_distance nan", "preprocess_data",
                 lambda ws: [*prep(ws), "--max_slice_distance", "nan"],
                 names=lambda ws: "max_slice_distance"),
        Scenario("no training data", "train",
                 lambda ws: [*_train_args(ws), "--root_path", str(ws / "nothing")],
                 names=lambda ws: str(ws / "nothing")),
        Scenario("list names an absent slice", "train", _train_args,
                 lambda ws: (ws / PROCESSED / "lists" / "train.txt").write_text(
                     "case0002_slice000\ncase0009_slice004\n"),
                 names=lambda ws: "case0009_slice004"),
        Scenario("truncated training slice", "train", _train_args,
                 lambda ws: _slice(ws).write_bytes(_slice(ws).read_bytes()[:80]),
                 names=lambda ws: str(_slice(ws))),
        Scenario("0-byte training slice", "train", _train_args,
                 lambda ws: _slice(ws, "T2w").write_bytes(b""),
                 names=lambda ws: str(_slice(ws, "T2w"))),
        Scenario("base_lr inf", "train", lambda ws: [*_train_args(ws), "--base_lr", "inf"],
                 names=lambda ws: "base_lr"),
        Scenario("output_dir is a file", "train", lambda ws: _train_args(ws, "afile"),
                 lambda ws: (ws / "afile").write_text("x"), names=lambda ws: str(ws / "afile"),
                 protect=("afile",)),
        Scenario("rerun into a finished run", "train", lambda ws: _train_args(ws, RUN),
                 names=lambda ws: str(ws / RUN), protect=(f"{RUN}/{CHECKPOINT_FINAL}",)),
        Scenario("priors file missing", "train", lambda ws: [
            *_train_args(ws), "--model", "immseg", "--priors_path", str(ws / "none.pt")],
                 names=lambda ws: str(ws / "none.pt")),
        Scenario("--fold without --folds", "train", lambda ws: [*_train_args(ws), "--fold", "1"],
                 names=lambda ws: "--folds"),
        Scenario("checkpoint missing", "test",
                 lambda ws: ["--checkpoint", str(ws / "none.pth"), "--device", "cpu"],
                 names=lambda ws: str(ws / "none.pth")),
        Scenario("foreign .pth", "test",
                 lambda ws: ["--checkpoint", str(ws / "foreign.pth"), "--device", "cpu"],
                 lambda ws: __import__("torch").save({"weights": 1}, ws / "foreign.pth"),
                 names=lambda ws: str(ws / "foreign.pth")),
        Scenario("truncated checkpoint", "test",
                 lambda ws: ["--checkpoint", str(ws / "cut.pth"), "--device", "cpu"],
                 lambda ws: (ws / "cut.pth").write_bytes(Path(_checkpoint(ws)).read_bytes()[
                     :1000]), names=lambda ws: str(ws / "cut.pth")),
        Scenario("NaN weights", "test",
                 lambda ws: ["--checkpoint", str(ws / "nan.pth"), "--device", "cpu"],
                 lambda ws: _nan_checkpoint(ws), names=lambda ws: str(ws / "nan.pth")),
        Scenario("unknown sequence", "test", lambda ws: [
            "--checkpoint", _checkpoint(ws), "--device", "cpu", "--sequences", "LGE,T1"],
                 names=lambda ws: "T1"),
        Scenario("cross-validation folder missing a fold", "test",
                 lambda ws: ["--run_dir", str(ws / "cv"), "--device", "cpu"],
                 lambda ws: _partial_cv(ws), names=lambda ws: str(ws / "cv" / "fold1")),
        Scenario("test volume of unknown axis order", "test", lambda ws: [
            "--checkpoint", _checkpoint(ws), "--device", "cpu", "--root_path",
            str(ws / "odd"), "--split", "test_vol"],
                 lambda ws: _odd_volume(ws), names=lambda ws: str(ws / "odd")),
        Scenario("--out is an input", "predict",
                 lambda ws: [*_predict_args(ws, str(_raw(ws, "LGE"))), "--overwrite"],
                 names=lambda ws: str(_raw(ws, "LGE")), protect=raw_inputs),
        Scenario("--out exists", "predict",
                 lambda ws: _predict_args(ws, str(ws / "old_pred.nii.gz")),
                 lambda ws: (ws / "old_pred.nii.gz").write_bytes(b"earlier output"),
                 names=lambda ws: str(ws / "old_pred.nii.gz"), protect=("old_pred.nii.gz",)),
        Scenario("--out not NIfTI", "predict", lambda ws: _predict_args(ws, str(ws / "p.png")),
                 names=lambda ws: "p.png"),
        Scenario("NaN input", "predict", lambda ws: _predict_args(ws, str(ws / "p.nii.gz")),
                 lambda ws: _modify(_raw(ws, "LGE"), lambda a: np.where(a > 0, np.nan, a)),
                 names=lambda ws: str(_raw(ws, "LGE")), protect=raw_inputs[:1]),
        Scenario("sagittal T2w input", "predict",
                 lambda ws: _predict_args(ws, str(ws / "p.nii.gz")),
                 lambda ws: _modify(_raw(ws, "T2w"), lambda a: a, _sagittal),
                 names=lambda ws: str(_raw(ws, "T2w"))),
        Scenario("case_dir root of several cases", "predict", lambda ws: [
            "--checkpoint", _checkpoint(ws), "--device", "cpu", "--case_dir", str(ws / "raw"),
            "--out", str(ws / "p.nii.gz")], names=lambda ws: "--case_id"),
        Scenario("a labelled case without a label map", "score_folder", lambda ws: [
            "--pred", str(ws / "preds"), "--raw_root", str(ws / "raw")],
                 lambda ws: (ws / "preds").mkdir(), names=lambda ws: CASE),
        Scenario("label map on another grid", "score_folder", lambda ws: [
            "--pred", str(ws / "preds"), "--raw_root", str(ws / "raw")],
                 lambda ws: _wrong_grid_predictions(ws),
                 names=lambda ws: str(ws / "preds" / f"{CASE}.nii.gz")),
    ]


def _nan_checkpoint(ws: Path) -> None:
    import torch

    payload = torch.load(_checkpoint(ws), weights_only=False)
    key = next(k for k, v in payload["model"].items() if v.is_floating_point())
    payload["model"][key] = torch.full_like(payload["model"][key], float("nan"))
    torch.save(payload, ws / "nan.pth")


def _partial_cv(ws: Path) -> None:
    fold = ws / "cv" / "fold0"
    shutil.copytree(ws / RUN, fold)
    config = json.loads((fold / "config.json").read_text()) | {"folds": 2, "fold": 0}
    (fold / "config.json").write_text(json.dumps(config))


def _odd_volume(ws: Path) -> None:
    for sequence in ("bSSFP", "LGE", "T2w"):
        path = ws / "odd" / sequence / "test_vol_h5" / f"{CASE}.npy.h5"
        path.parent.mkdir(parents=True)
        with h5py.File(path, "w") as handle:
            handle["image"] = np.zeros((5, 40, 30), np.float32)
            handle["label"] = np.zeros((5, 40, 30), np.uint8)


def _wrong_grid_predictions(ws: Path) -> None:
    (ws / "preds").mkdir()
    for case in ("case0001", "case0002"):
        label = nib.load(str(ws / RAW / "label" / f"{case}_gt.nii.gz"))
        myocardium = (np.asanyarray(label.dataobj)[:-2] == 200).astype(np.uint8)
        _nifti(ws / "preds" / f"{case}.nii.gz", myocardium, label.affine)


def build_workspace(base: Path) -> Path:
    """Two phantom cases, their processed layout and a tiny checkpoint trained for one epoch."""
    ws = base / "workspace"
    write_phantom_dataset(ws / "raw", 2, seed=7)
    run_preprocessing(ws / "raw", ws / PROCESSED,
                      PreprocessConfig(affine_registration=False, nonrigid_registration=False),
                      RunOptions(test_every=2, folds=0, qa=False))
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        code = train_script.main(_train_args(ws, RUN))
    if code:
        raise RuntimeError("could not train the workspace's checkpoint")
    return ws


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def run_scenario(scenario: Scenario, workspace: Path, scratch: Path) -> Outcome:
    ws = scratch / scenario.name.replace(" ", "_").replace("/", "_")
    shutil.copytree(workspace, ws, symlinks=True)
    scenario.setup(ws)
    before = {name: _digest(ws / name) for name in scenario.protect}
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = COMMANDS[scenario.command](scenario.argv(ws))
        except SystemExit as exit_:
            code = int(exit_.code or 0)
        except Exception as error:  # a traceback is exactly what this looks for
            code, stderr = -1, io.StringIO(f"TRACEBACK {type(error).__name__}: {error}")
    text = stderr.getvalue()
    errors = [line for line in text.splitlines() if "ERROR" in line or "error:" in line
              or line.startswith("TRACEBACK")]
    message = (errors[0] if errors else text.strip().splitlines()[-1] if text.strip() else "")
    message = message.split(": ", 1)[-1] if "ERROR" in message else message
    message = message.replace(str(ws), "<ws>")
    names = None if scenario.names is None else scenario.names(ws) in text
    intact = all(_digest(ws / name) == digest for name, digest in before.items())
    shutil.rmtree(ws, ignore_errors=True)
    return Outcome(scenario.name, scenario.command, code, message, names, intact)


def markdown(outcomes: list[Outcome]) -> str:
    lines = ["| command | bad input | exit | names the file | nothing lost | message |",
             "|---|---|---|---|---|---|"]
    for o in outcomes:
        names = "-" if o.names_file is None else "yes" if o.names_file else "**no**"
        short = o.message if len(o.message) < 110 else o.message[:107] + "..."
        lines.append(f"| {o.command} | {o.name} | {o.code} | {names} | "
                     f"{'yes' if o.intact else '**no**'} | {short.replace('|', '/')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, help="also write the outcomes here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        workspace = build_workspace(base)
        outcomes = [run_scenario(s, workspace, base / "scenarios") for s in scenarios()]
    print(markdown(outcomes))
    good = sum(o.ok for o in outcomes)
    print(f"\n{good} of {len(outcomes)} end in a non-zero exit that names the file, with "
          "nothing lost")
    if args.json:
        Path(args.json).write_text(json.dumps([o.__dict__ for o in outcomes], indent=2))
    return 0 if good == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
