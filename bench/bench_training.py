"""Training throughput: can the data loader keep the network fed?

    python -m bench.bench_training --model immseg --vit_name R26-ViT-S_16 --batch_size 8 \
        --img_size 128 --workers 2 [--data_root data/phantom/Processed_data]

Measures, one after the other so that they do not share the cores:

* the train step, :class:`training.step.TrainStep`, the object ``train.py`` calls (forward, the
  full objective with the contrastive term on, backward, AdamW; float16 autocast on CUDA), on
  random initial weights and one synthetic batch: s/step and images/s;
* the real :class:`datasets.dataset.SliceDataset` with augmentation, the variant's default
  per-sequence jitter (``--sequence_jitter``) and sequence dropout when asked, behind a
  ``DataLoader`` with ``--workers`` processes: images/s. Without ``--data_root`` it reads a
  temporary processed layout of 128x128 ring slices (:mod:`datasets.rings`);
* the ratio loader / model images per second (target >= 10: the loader then costs the training
  loop at most a tenth of a step even with no overlap), peak resident memory of this process and
  of the largest loader worker, and on CUDA the peak allocated GPU memory.

The immseg priors are a random bank of BiomedCLIP's width: the timing needs shapes, not meaning.
Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

from bench.measure import bench_priors, peak_rss_mb, sync
from datasets.augment import AugmentConfig, drop_sequences
from datasets.dataset import EpochIndices, SliceDataset
from datasets.labels import MODALITIES, NUM_CLASSES
from datasets.processed import ProcessedLayout
from datasets.rings import write_ring_dataset
from datasets.sequence_jitter import JitterConfig
from networks.backbones import list_backbones
from networks.objective import ObjectiveConfig, TrainingObjective
from networks.sequences import zero_absent
from networks.variants import VARIANTS, count_parameters, create_network
from trainer import default_sequence_jitter
from training.step import TrainStep
from utils import resolve_device

#: Loader images/s over model images/s that leaves the loader out of the critical path.
TARGET_RATIO = 10.0


def bench_model(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Median seconds of ``args.steps`` train steps after ``args.warmup`` untimed ones."""
    torch.manual_seed(0)
    priors = bench_priors(args.model)
    model = create_network(args.model, backbone=args.vit_name, img_size=args.img_size,
                           num_classes=NUM_CLASSES, priors=priors).to(device)
    model.train()
    config = ObjectiveConfig()
    # The step train.py takes (training.step.TrainStep), on one fixed synthetic batch.
    step = TrainStep(model, TrainingObjective(NUM_CLASSES, config).to(device),
                     torch.optim.AdamW(model.parameters(), lr=1e-4), device,
                     amp=args.amp, pass_mask=args.sequence_dropout > 0)
    images = torch.rand(args.batch_size, len(MODALITIES), args.img_size, args.img_size)
    labels = torch.randint(0, NUM_CLASSES, (args.batch_size, args.img_size, args.img_size))
    mask = torch.ones(args.batch_size, len(MODALITIES), dtype=torch.bool)
    if args.sequence_dropout > 0:
        rng = np.random.default_rng(0)
        mask = torch.from_numpy(np.stack([
            drop_sequences(len(MODALITIES), args.sequence_dropout, rng)
            for _ in range(args.batch_size)]))
        images = zero_absent(images, mask)
    batch = {"image": images.to(device), "label": labels.to(device),
             "sequence_mask": mask.to(device)}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for index in range(args.warmup + args.steps):
        sync(device)
        start = time.perf_counter()
        # The contrastive epoch: the most expensive objective a run meets.
        step(batch, config.contrastive_start_epoch)
        sync(device)
        if index >= args.warmup:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    result = {"parameters_m": round(count_parameters(model) / 1e6, 3),
              "s_per_step": round(seconds, 4),
              "images_per_s": round(args.batch_size / seconds, 2),
              "steps_timed": len(times)}
    if device.type == "cuda":
        result["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return result


def bench_loader(args: argparse.Namespace, layout: ProcessedLayout) -> dict[str, Any]:
    """Images per second the augmenting loader delivers, worker start-up excluded."""
    names = layout.names("train")
    dataset = SliceDataset(layout, names, args.img_size, AugmentConfig(), seed=0,
                           sequence_dropout=args.sequence_dropout,
                           jitter=JitterConfig(args.sequence_jitter)
                           if args.sequence_jitter > 0 else None)
    # As train.py feeds it: the epoch travels with each index to the persistent workers.
    sampler = EpochIndices(RandomSampler(dataset, generator=torch.Generator().manual_seed(0)))
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler,
                        num_workers=args.workers, drop_last=True,
                        persistent_workers=args.workers > 0)
    if len(loader) == 0:
        raise ValueError(f"{layout.root}: {len(names)} slices make no batch of "
                         f"{args.batch_size}")
    delivered, epoch, start = 0, 0, None
    while delivered < args.loader_batches:
        sampler.set_epoch(epoch)
        for batch in loader:
            if start is None:  # the first batch waits for the workers to start
                start = time.perf_counter()
                continue
            delivered += 1
            if delivered >= args.loader_batches:
                break
            del batch
        epoch += 1
    seconds = time.perf_counter() - start
    del loader  # shuts the workers down, so that their peak RSS is counted below
    images = delivered * args.batch_size
    return {"workers": args.workers, "slices": len(names), "batches_timed": delivered,
            "images_per_s": round(images / seconds, 2),
            "s_per_batch": round(seconds / delivered, 4)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="immseg", choices=sorted(VARIANTS))
    parser.add_argument("--vit_name", default="R26-ViT-S_16", choices=list_backbones())
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--img_size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--data_root", default=None,
                        help="processed layout to read (default: temporary synthetic slices)")
    parser.add_argument("--synthetic_slices", type=int, default=64)
    parser.add_argument("--sequence_dropout", type=float, default=0.0)
    parser.add_argument("--sequence_jitter", type=float, default=None,
                        help="loader: train.py's --sequence_jitter (default: the variant's, "
                             "0.5 for immseg)")
    parser.add_argument("--steps", type=int, default=5, help="timed train steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed train steps first")
    parser.add_argument("--loader_batches", type=int, default=40, help="timed loader batches")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no_amp", dest="amp", action="store_false",
                        help="no float16 autocast on CUDA (train.py's --no_amp)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("batch_size", "steps", "loader_batches", "synthetic_slices"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.workers < 0 or args.warmup < 0:
        raise ValueError("--workers and --warmup must be >= 0")
    if args.sequence_jitter is None:
        args.sequence_jitter = default_sequence_jitter(args.model)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory(prefix="bench_training_") as scratch:
        if args.data_root is None:
            layout = ProcessedLayout(write_ring_dataset(
                Path(scratch), train_cases=1, slices_per_case=args.synthetic_slices, size=128))
            source = f"synthetic: {args.synthetic_slices} ring slices of 128x128"
        else:
            layout, source = ProcessedLayout(Path(args.data_root)), args.data_root
        loader = bench_loader(args, layout)
    model = bench_model(args, device)
    ratio = loader["images_per_s"] / model["images_per_s"]
    report = {
        "model": args.model, "vit_name": args.vit_name, "batch_size": args.batch_size,
        "img_size": args.img_size, "sequence_dropout": args.sequence_dropout,
        "sequence_jitter": args.sequence_jitter,
        "amp": args.amp and device.type == "cuda",
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "data": source,
        "train_step": model,
        "loader": loader,
        "loader_to_model_ratio": round(ratio, 2),
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_worker_rss_mb": round(peak_rss_mb(resource.RUSAGE_CHILDREN), 1),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
