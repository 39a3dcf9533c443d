"""Train-step time and peak memory of each network variant, with the full training objective.

    python -m bench.bench_variants --backbone R50-ViT-B_16 --batch 8 --img-size 128

Each variant runs in a child process so that its peak memory is its own: on CUDA
``torch.cuda.max_memory_allocated``, on the CPU the process's peak resident set (which includes
the interpreter and torch, about the same for every variant; ``baseline_rss_mb`` reports it).
Besides the paper's variants, ``three_encoders`` is the reference for immseg's overhead: three
encoders, bottleneck and skips concatenated and fused by 1x1 convs, one decoder, a conv head;
the target is immseg within 1.25x of it. The text tower is never run: the priors are a bank
read from disk, and the report says whether open_clip was even imported during the steps.
Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from bench.measure import peak_rss_mb, sync
from networks.backbones import backbone_config, list_backbones
from networks.immseg import SkipFusion
from networks.objective import ObjectiveConfig, TrainingObjective, forward_outputs
from networks.transunet import SegmentationHead, TransUNetDecoder, TransUNetEncoder
from networks.variants import VARIANTS, count_parameters, create_network
from prompts.bank import random_prior_bank

REFERENCE = "three_encoders"


class ThreeEncoders(nn.Module):
    """The plain multi-encoder network immseg adds its modules to (no text, no attention)."""

    def __init__(self, backbone: str, img_size: int, num_classes: int, sequences: int = 3):
        super().__init__()
        config = backbone_config(backbone, img_size=img_size, in_channels=1,
                              num_classes=num_classes)
        self.encoders = nn.ModuleList(TransUNetEncoder.from_config(config, in_channels=1)
                                      for _ in range(sequences))
        hidden, skips = self.encoders[0].out_channels, self.encoders[0].skip_channels
        self.fuse = nn.Conv2d(sequences * hidden, hidden, kernel_size=1)
        self.skip_fusion = SkipFusion(skips, sequences, config.decoder.n_skip)
        self.decoder = TransUNetDecoder(hidden, skips, config.decoder)
        self.head = SegmentationHead(self.decoder.out_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        encoded = [encoder(x[:, i:i + 1]) for i, encoder in enumerate(self.encoders)]
        fused = self.fuse(torch.cat([features for features, _ in encoded], dim=1))
        skips = self.skip_fusion([s for _, s in encoded], None)
        return self.head(self.decoder(fused, skips))


def _build(variant: str, backbone: str, img_size: int, num_classes: int) -> nn.Module:
    if variant == REFERENCE:
        return ThreeEncoders(backbone, img_size, num_classes)
    priors = random_prior_bank(model_id="bench/random") if variant == "immseg" else None
    return create_network(variant, backbone=backbone, img_size=img_size,
                          num_classes=num_classes, priors=priors)


def bench_one(variant: str, backbone: str, batch: int, img_size: int, iters: int, warmup: int,
              device_name: str, threads: int | None) -> dict[str, Any]:
    """Median seconds of ``iters`` AdamW train steps after ``warmup``, and peak memory."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device_name)
    torch.manual_seed(0)
    rss_before = peak_rss_mb()
    model = _build(variant, backbone, img_size, 4).to(device).train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4)
    # Contrastive term on from the first step: the most expensive objective immseg runs.
    objective = TrainingObjective(4, ObjectiveConfig(contrastive_start_epoch=0)).to(device)
    x = torch.rand(batch, 3, img_size, img_size, device=device)
    labels = torch.randint(0, 4, (batch, img_size, img_size), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(warmup + iters):
        sync(device)
        start = time.perf_counter()
        optimiser.zero_grad(set_to_none=True)
        loss, _ = objective(forward_outputs(model, x), labels, epoch=0)
        loss.backward()
        optimiser.step()
        sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
            else peak_rss_mb())
    return {
        "variant": variant,
        "parameters": count_parameters(model),
        "sec_per_step": round(statistics.median(times), 4),
        "sec_per_image": round(statistics.median(times) / batch, 4),
        "best_sec_per_step": round(min(times), 4),
        "step_times": [round(t, 4) for t in times],
        "peak_memory_mb": round(peak, 1),
        "memory_kind": "cuda_max_allocated" if device.type == "cuda" else "process_peak_rss",
        "baseline_rss_mb": round(rss_before, 1),
        "open_clip_imported": "open_clip" in sys.modules,
    }


def _child(queue: Any, *args: Any) -> None:
    try:
        queue.put(bench_one(*args))
    except Exception as error:  # reported in the JSON instead of killing the whole run
        queue.put({"variant": args[0], "error": f"{type(error).__name__}: {error}"})


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=[*VARIANTS, REFERENCE],
                        choices=[*VARIANTS, REFERENCE])
    parser.add_argument("--backbone", default="R50-ViT-B_16", choices=list_backbones())
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=128)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per run")
    args = parser.parse_args(argv)
    context = multiprocessing.get_context("spawn")
    results = []
    for variant in args.variants:
        queue = context.Queue()
        process = context.Process(target=_child, args=(
            queue, variant, args.backbone, args.batch, args.img_size, args.iters, args.warmup,
            args.device, args.threads))
        process.start()
        results.append(queue.get())
        process.join()
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    by_name = {r["variant"]: r for r in results if "error" not in r}
    ratios: dict[str, dict[str, float]] = {}
    if REFERENCE in by_name:
        # Best-of is robust to other load on a shared machine; the median is the usual figure.
        for key in ("sec_per_step", "best_sec_per_step"):
            reference = by_name[REFERENCE][key]
            ratios[key] = {name: round(r[key] / reference, 3) for name, r in by_name.items()}
    report = {
        "backbone": args.backbone, "batch": args.batch, "img_size": args.img_size,
        "device": args.device,
        "device_name": torch.cuda.get_device_name(0) if args.device.startswith("cuda")
        else platform.processor() or platform.machine(),
        "threads": args.threads or torch.get_num_threads(),
        "results": results,
        f"time_ratio_to_{REFERENCE}": ratios,
        "target": f"immseg <= 1.25 x {REFERENCE}",
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
