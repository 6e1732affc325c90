"""Sample grids as PNG: what the evaluation and sampling stages show of their samples, and prepare_data of
its data. numpy and matplotlib only (torch tensors on the CPU convert as they are), so prepare_data draws
without importing torch."""

from __future__ import annotations

import io
import math

import numpy as np
from matplotlib.figure import Figure
from numpy.typing import ArrayLike


def grid_png(
    x: ArrayLike, reference: ArrayLike | None, size: int, title: str, label: str = "samples"
) -> bytes:
    """Images [N, C, H, W] in [-1, 1] as a size x size grid, or 2-D points [N, 2] as a scatter (`label` in
    the legend) over the `reference` data."""
    x = np.asarray(x)
    fig = Figure(figsize=(4, 4), dpi=100)
    ax = fig.subplots()
    if x.ndim == 2:
        if reference is not None:
            reference = np.asarray(reference)
            ax.scatter(reference[:, 0], reference[:, 1], s=2, alpha=0.3, label="held-out data")
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.5, label=label)
        ax.legend(loc="upper right", fontsize=6)
    else:
        k = min(size, int(math.sqrt(len(x))))
        imgs = ((np.clip(x[: k * k], -1, 1) + 1) / 2).transpose(0, 2, 3, 1)
        imgs = np.pad(imgs, ((0, 0), (0, 1), (0, 1), (0, 0)), constant_values=0.5)  # 1-px grey gutter
        c, h, w = imgs.shape[3], imgs.shape[1], imgs.shape[2]
        grid = imgs.reshape(k, k, h, w, c).transpose(0, 2, 1, 3, 4).reshape(k * h, k * w, c)
        cmap = "gray" if c == 1 else None
        ax.imshow(grid.squeeze(-1) if c == 1 else grid, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        ax.axis("off")
    ax.set_title(title, fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()
