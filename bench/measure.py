"""Small measuring and reporting helpers shared by the bench scripts (torch is imported only
by the helpers that need it, so that the table and decision tools start quickly)."""

from __future__ import annotations

import json
import resource
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from prompts.bank import PriorBank


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that a wall-clock reading covers it (no-op on the CPU)."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def bench_priors(variant: str) -> PriorBank | None:
    """Random text priors for a variant that needs them (timing does not depend on the text).
    Imported here, not at the top: the benches without networks start without them."""
    from networks.variants import VARIANTS
    from prompts.bank import random_prior_bank

    return random_prior_bank(model_id="bench/random") if VARIANTS[variant].text_priors else None


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """Peak resident memory in MiB of this process (or, with ``RUSAGE_CHILDREN``, of the largest
    waited-for child); ``ru_maxrss`` is in KiB on Linux."""
    return resource.getrusage(who).ru_maxrss / 1024


def _print(produce: Callable[[], Any], render: Callable[[Any], str]) -> int:
    """Print ``render(produce())`` and return 0; for bad input (the error ``produce`` raises)
    print the message to stderr and return 1, not a traceback."""
    try:
        result = produce()
    except (ValueError, RuntimeError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(render(result))
    return 0


def print_report(produce: Callable[[], dict]) -> int:
    """Print the report ``produce`` returns as JSON (see :func:`_print` for errors)."""
    return _print(produce, lambda report: json.dumps(report, indent=2))


def print_lines(produce: Callable[[], list[str]]) -> int:
    """Print the lines ``produce`` returns, a table or a verdict (errors as :func:`_print`)."""
    return _print(produce, "\n".join)
