"""Time one training step (forward + backward + SGD update) of each registered variant.

Run from the repository root: ``python -m bench.bench_model --variants tiny R26-ViT-S_16``.
Prints one JSON document with seconds per step and per image and the parameter count.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from bench.measure import sync
from networks import create_transunet, list_backbones


def bench_variant(
    name: str,
    *,
    batch: int,
    img_size: int,
    in_channels: int,
    num_classes: int,
    iters: int,
    warmup: int,
    device: torch.device,
) -> dict[str, Any]:
    """Median wall time of ``iters`` train steps after ``warmup`` untimed ones."""
    torch.manual_seed(0)
    model = create_transunet(
        name, img_size=img_size, in_channels=in_channels, num_classes=num_classes
    ).to(device)
    model.train()
    optimiser = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, in_channels, img_size, img_size, device=device)
    target = torch.randint(0, num_classes, (batch, img_size, img_size), device=device)
    times = []
    for step in range(warmup + iters):
        sync(device)
        start = time.perf_counter()
        optimiser.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        optimiser.step()
        sync(device)
        if not torch.isfinite(loss):
            raise RuntimeError(f"{name}: non-finite loss {loss.item()} at step {step}")
        if step >= warmup:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    return {
        "model": name,
        "params": sum(p.numel() for p in model.parameters()),
        "sec_per_step": round(step_s, 4),
        "sec_per_image": round(step_s / batch, 4),
        "step_times": [round(t, 4) for t in times],
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=None,
                        help="registered names (default: all)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--img-size", type=int, default=128)
    parser.add_argument("--in-channels", type=int, default=3)
    parser.add_argument("--num-classes", type=int, default=4)
    parser.add_argument("--iters", type=int, default=3, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.iters < 1 or args.warmup < 0:
        parser.error("--batch and --iters must be >= 1, --warmup >= 0")
    variants = args.variants or list_backbones()
    unknown = sorted(set(variants) - set(list_backbones()))
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {list_backbones()}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = [
        bench_variant(
            name, batch=args.batch, img_size=args.img_size, in_channels=args.in_channels,
            num_classes=args.num_classes, iters=args.iters, warmup=args.warmup, device=device,
        )
        for name in variants
    ]
    report = {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "batch": args.batch,
        "img_size": args.img_size,
        "in_channels": args.in_channels,
        "num_classes": args.num_classes,
        "results": results,
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
