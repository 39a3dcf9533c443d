"""Seconds per volume of batched whole-volume inference against one slice per forward pass.

    python -m bench.bench_inference --model immseg --vit_name R50-ViT-B_16 --slices 12 \
        --img_size 128

Both paths are those of :mod:`networks.inference` (``predict_volume`` and its slice-by-slice
reference), timed with and without flip TTA on one random volume, with a randomly initialised
network (and, for immseg, a random prior bank of BiomedCLIP's width: timing needs the shapes,
not the meaning). The target is a batched speed-up of at least 3x; on a CPU with few cores a
large backbone already saturates the cores with one slice, so the ratio there says more about
the machine than about batching. Also reports whether both paths gave the same labels, and the
peak memory (process peak RSS; on CUDA also ``max_memory_allocated``). Prints one JSON document.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from bench.measure import bench_priors, peak_rss_mb, print_report, sync
from datasets.labels import MODALITIES
from networks.backbones import list_backbones
from networks.inference import predict_volume, predict_volume_slicewise
from networks.variants import VARIANTS, count_parameters, create_network

TARGET_RATIO = 3.0
_TTA_MODES = {"off": (False,), "on": (True,), "both": (False, True)}


def _time(run: Callable[[], np.ndarray], device: torch.device, repeats: int,
          warmup: int) -> tuple[list[float], np.ndarray]:
    """Wall seconds of ``repeats`` calls after ``warmup`` untimed ones, and the last result."""
    result = None
    for _ in range(warmup):
        result = run()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        result = run()
        sync(device)
        times.append(time.perf_counter() - start)
    assert result is not None
    return times, result


def bench(model: nn.Module, image: np.ndarray, img_size: int, device: torch.device, *,
          batch_size: int, tta: bool, repeats: int, warmup: int) -> dict[str, Any]:
    """Batched and slice-by-slice timings of one volume, their ratio and label agreement."""
    batched_times, batched = _time(
        lambda: predict_volume(model, image, img_size, device, batch_size, tta=tta), device,
        repeats, warmup)
    slicewise_times, slicewise = _time(
        lambda: predict_volume_slicewise(model, image, img_size, device, tta=tta), device,
        repeats, warmup)
    batched_s, slicewise_s = statistics.median(batched_times), statistics.median(slicewise_times)
    return {
        "tta": tta,
        "batched_sec_per_volume": round(batched_s, 4),
        "slicewise_sec_per_volume": round(slicewise_s, 4),
        "ratio": round(slicewise_s / batched_s, 2),
        "best_of_ratio": round(min(slicewise_times) / min(batched_times), 2),
        "batched_times": [round(t, 4) for t in batched_times],
        "slicewise_times": [round(t, 4) for t in slicewise_times],
        "labels_agree": float(np.mean(batched == slicewise)),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="immseg", choices=sorted(VARIANTS))
    parser.add_argument("--vit_name", default="R50-ViT-B_16", choices=list_backbones())
    parser.add_argument("--slices", type=int, default=12, help="slices in the volume")
    parser.add_argument("--img_size", type=int, default=128, help="network input size")
    parser.add_argument("--volume_size", type=int, default=None,
                        help="stored slice size (default: img_size, i.e. no resizing)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--tta", default="both", choices=sorted(_TTA_MODES),
                        help="time without flip TTA, with it, or both")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return print_report(lambda: run(args))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The report: every timing of one synthetic volume (see the module docstring)."""
    for name in ("slices", "img_size", "batch_size", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    rss_before = peak_rss_mb()
    priors = bench_priors(args.model)
    model = create_network(args.model, backbone=args.vit_name, img_size=args.img_size,
                           priors=priors)
    model = model.to(device).eval()
    size = args.volume_size or args.img_size
    image = np.random.default_rng(0).random((args.slices, len(MODALITIES), size, size),
                                            dtype=np.float32)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    results = [bench(model, image, args.img_size, device, batch_size=args.batch_size, tta=tta,
                     repeats=args.repeats, warmup=args.warmup)
               for tta in _TTA_MODES[args.tta]]
    report: dict[str, Any] = {
        "model": args.model, "vit_name": args.vit_name,
        "parameters": count_parameters(model), "slices": args.slices,
        "img_size": args.img_size, "volume_size": size, "batch_size": args.batch_size,
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "results": results,
        "target": f"ratio >= {TARGET_RATIO}",
        "meets_target": all(r["ratio"] >= TARGET_RATIO for r in results),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "rss_before_model_mb": round(rss_before, 1),
    }
    if device.type == "cuda":
        report["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return report


if __name__ == "__main__":
    sys.exit(main())
