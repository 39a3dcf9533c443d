"""The GPU checks, as one prepared run for a machine with an accelerator (JSON files).

    python -m bench.gpu_checks --out $OUT [--device cuda] [--quick]

1. ``train_step_amp.json`` / ``train_step_fp32.json``: one training step of immseg on
   R50-ViT-B_16 at 128 px, batch 24 (the release's per-GPU batch), with and without float16
   autocast (:mod:`bench.bench_training`'s step: the step train.py takes);
2. ``train_step_released.json``: the same for ``immseg_released``;
3. ``inference.json``: batched whole-volume inference against one slice per forward pass
   (:mod:`bench.bench_inference`);
4. ``short_training.json``: a short R50 immseg training through ``trainer.train`` on synthetic
   ring slices (:mod:`datasets.rings`, no NIfTI readers needed), with its wall time and final
   loss.

Everything runs with the packages of a bare GPU image (torch, numpy, scipy, h5py, tqdm,
tensorboard) plus medpy, which the trainer's metrics import: carry it as a wheel (see
docs/gpu.md). ``--quick`` shrinks every size so the plumbing can be checked on a CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench import bench_inference, bench_training
from datasets.rings import write_ring_dataset
from prompts.bank import random_prior_bank, save_prior_bank
from utils import write_json


def _bench(module, argv: list[str]) -> dict[str, Any]:
    """Run a bench's ``main`` and return the JSON report it prints."""
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = module.main(argv)
    if code != 0:
        raise RuntimeError(f"{module.__name__} {' '.join(argv)} failed ({code})")
    return json.loads(buffer.getvalue())


def short_training(out: Path, device: str, quick: bool) -> dict[str, Any]:
    from trainer import TrainConfig, train

    work = out / "work"
    root = write_ring_dataset(work / "data", train_cases=4 if quick else 20,
                              slices_per_case=2 if quick else 8, size=64 if quick else 128)
    bank = save_prior_bank(random_prior_bank(model_id="gpu_checks/random"), work / "bank.pt")
    config = TrainConfig(
        model="immseg", vit_name="tiny" if quick else "R50-ViT-B_16", root_path=str(root),
        output_dir=str(work / "run"), img_size=64 if quick else 128,
        batch_size=4 if quick else 24, max_epochs=1 if quick else 5, num_workers=0 if quick
        else 4, val_every=0, val_fraction=0.0, device=device, priors_path=str(bank),
        contrastive_start_epoch=0)
    start = time.perf_counter()
    result = train(config)
    return {"backbone": config.vit_name, "slices": len(list((root / "LGE" / "train_npz")
                                                           .glob("*.npz"))),
            "epochs": result.epochs, "iterations": result.iterations,
            "seconds": round(time.perf_counter() - start, 2),
            "final_loss": round(float(result.final_loss), 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the JSON files")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (plumbing on a CPU)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    backbone, batch, steps = ("tiny", "2", "2") if args.quick else ("R50-ViT-B_16", "24", "10")
    common = ["--vit_name", backbone, "--img_size", "64" if args.quick else "128",
              "--batch_size", batch, "--steps", steps, "--warmup", "1" if args.quick else "3",
              "--synthetic_slices", "8", "--loader_batches", "1", "--device", args.device]
    write_json(out / "environment.json", {
        "torch": torch.__version__, "python": platform.python_version(),
        "device": (torch.cuda.get_device_name(0) if torch.cuda.is_available()
                   else platform.processor() or platform.machine())})
    checks = {
        "train_step_amp": lambda: _bench(bench_training, ["--model", "immseg", *common]),
        "train_step_fp32": lambda: _bench(bench_training,
                                          ["--model", "immseg", *common, "--no_amp"]),
        "train_step_released": lambda: _bench(bench_training,
                                              ["--model", "immseg_released", *common]),
        "inference": lambda: _bench(bench_inference, [
            "--model", "immseg", "--vit_name", backbone, "--slices", "4" if args.quick else "12",
            "--img_size", "64" if args.quick else "128", "--repeats", "1" if args.quick else "5",
            "--warmup", "1", "--device", args.device]),
        "short_training": lambda: short_training(out, args.device, args.quick),
    }
    failed = []
    for name, check in checks.items():
        start = time.perf_counter()
        try:
            report = check()
        except Exception as error:  # one failed check must not lose the others' figures
            report, failed = {"error": repr(error)}, [*failed, name]
        report["check_seconds"] = round(time.perf_counter() - start, 2)
        write_json(out / f"{name}.json", report)
        print(f"{name}: {json.dumps(report)[:300]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
