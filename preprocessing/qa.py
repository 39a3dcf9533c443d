"""Quality-assurance picture per case: every sequence before and after registration.

Rows are slices; columns are the fixed (labelled) sequence and, for each moving sequence, its
slice before and after registration. The fixed sequence's myocardium contour is drawn on every
panel, so misalignment shows as myocardium leaving the contour.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from utils import atomic_path

_MAX_ROWS = 4


def write_qa_png(path: Path, case_id: str, fixed: str, label: np.ndarray,
                 before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> None:
    """Write the montage for ``[D, H, W]`` stacks; at most four evenly spread slices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depth = label.shape[0]
    rows = np.unique(np.linspace(0, depth - 1, min(depth, _MAX_ROWS)).round().astype(int))
    moving = [name for name in after if name != fixed]
    columns = [(fixed, after[fixed], "")] + [
        (name, stack, tag) for name in moving
        for stack, tag in ((before[name], "before"), (after[name], "after"))]
    figure, axes = plt.subplots(len(rows), len(columns), squeeze=False,
                                figsize=(2.2 * len(columns), 2.2 * len(rows)))
    myocardium = label > 0
    for r, k in enumerate(rows):
        for c, (name, stack, tag) in enumerate(columns):
            axis = axes[r, c]
            axis.imshow(stack[k], cmap="gray", vmin=0, vmax=255)
            if myocardium[k].any():
                axis.contour(myocardium[k], levels=[0.5], colors="red", linewidths=0.6)
            axis.set_xticks([])
            axis.set_yticks([])
            if r == 0:
                axis.set_title(f"{name} {tag}".strip(), fontsize=8)
        axes[r, 0].set_ylabel(f"slice {k}", fontsize=8)
    figure.suptitle(f"{case_id}: {fixed} myocardium contour", fontsize=9)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=80, format="png")
    plt.close(figure)
