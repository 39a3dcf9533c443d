"""Process-group set-up for torchrun (DistributedDataParallel), and the one-process fallback.

``torchrun --nproc_per_node=N train.py ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and
the rendezvous variables; :func:`init_distributed` reads them, picks NCCL on CUDA and gloo on
the CPU, and gives every process its device (``cuda:LOCAL_RANK``). Without those variables the
run is a single process and nothing is initialised, so the same code path serves both.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from networks.losses import global_sum

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """Who this process is: ``rank`` of ``world_size`` and the device it trains on."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, writes TensorBoard and saves checkpoints."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError as error:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from error


def init_distributed(device: torch.device) -> DistContext:
    """Join the torchrun process group if there is one; ``device`` is the single-process choice.

    On CUDA each process takes ``cuda:LOCAL_RANK``; a CUDA request with fewer visible GPUs than
    local ranks is an error rather than several processes silently sharing one GPU.
    """
    world_size = _env_int("WORLD_SIZE") or 1
    if world_size == 1:
        return DistContext(device=device)
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    if rank is None or local_rank is None:
        raise ValueError("WORLD_SIZE is set but RANK/LOCAL_RANK are not: launch with torchrun")
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"local rank {local_rank} needs a GPU but only "
                             f"{torch.cuda.device_count()} are visible")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    log.info("process %d/%d (local %d) on %s, backend %s", rank, world_size, local_rank,
             device, backend)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def distributed_session(device: torch.device) -> Iterator[DistContext]:
    """:func:`init_distributed` and a guaranteed :func:`shutdown_distributed`."""
    context = init_distributed(device)
    try:
        yield context
    finally:
        if context.distributed:
            shutdown_distributed()


def broadcast_flag(flag: bool, context: DistContext) -> bool:
    """Rank 0's ``flag`` on every rank (e.g. early stopping decided on rank 0's validation)."""
    if not context.distributed:
        return flag
    value = torch.tensor([1 if flag else 0], device=context.device)
    dist.broadcast(value, src=0)
    return bool(value.item())


class AllReduceBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics come from the global batch over a gloo group.

    torch's SyncBatchNorm runs on GPUs only; this one serves CPU (gloo) runs, so that N CPU
    processes normalise exactly as one process does on the whole batch. Sums, sums of squares
    and counts are all-reduced with gradients, so the backward is the global one too.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        channels = x.shape[1]
        dims = [0, *range(2, x.ndim)]
        count = torch.full((1,), x.numel() / channels, dtype=x.dtype, device=x.device)
        totals = global_sum(torch.cat([x.sum(dims), (x * x).sum(dims), count]))
        total = totals[-1]
        mean = totals[:channels] / total
        var = (totals[channels:2 * channels] / total - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                momentum = self.momentum if self.momentum is not None else 0.1
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * total / (total - 1).clamp_min(1),
                                       momentum)
                self.num_batches_tracked += 1
        shape = (1, channels) + (1,) * (x.ndim - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Make every BatchNorm use global-batch statistics: SyncBatchNorm on CUDA, else ours."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _replace_batchnorm(model)


def _replace_batchnorm(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, AllReduceBatchNorm2d):
        replacement = AllReduceBatchNorm2d(module.num_features, module.eps, module.momentum,
                                           module.affine, module.track_running_stats)
        replacement.load_state_dict(module.state_dict())
        return replacement
    for name, child in module.named_children():
        setattr(module, name, _replace_batchnorm(child))
    return module
