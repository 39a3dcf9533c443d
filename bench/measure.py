"""Small measuring helpers shared by the bench scripts."""

from __future__ import annotations

import resource

import torch


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that a wall-clock reading covers it (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """Peak resident memory in MiB of this process (or, with ``RUSAGE_CHILDREN``, of the largest
    waited-for child); ``ru_maxrss`` is in KiB on Linux."""
    return resource.getrusage(who).ru_maxrss / 1024
