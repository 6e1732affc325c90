"""Sample grids as PNG: what the evaluation and sampling stages show of their samples."""

from __future__ import annotations

import io
import math

import torch
from matplotlib.figure import Figure
from torch import Tensor


def grid_png(x: Tensor, reference: Tensor | None, size: int, title: str) -> bytes:
    """Images as a size x size grid, or 2-D points as a scatter over the `reference` data."""
    fig = Figure(figsize=(4, 4), dpi=100)
    ax = fig.subplots()
    if x.ndim == 2:
        if reference is not None:
            ax.scatter(reference[:, 0], reference[:, 1], s=2, alpha=0.3, label="held-out data")
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.5, label="samples")
        ax.legend(loc="upper right", fontsize=6)
    else:
        k = min(size, int(math.sqrt(len(x))))
        imgs = ((x[: k * k].clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)
        imgs = torch.nn.functional.pad(imgs, (0, 0, 0, 1, 0, 1), value=0.5).numpy()  # 1-px grey gutter
        c, h, w = imgs.shape[3], imgs.shape[1], imgs.shape[2]
        grid = imgs.reshape(k, k, h, w, c).transpose(0, 2, 1, 3, 4).reshape(k * h, k * w, c)
        cmap = "gray" if c == 1 else None
        ax.imshow(grid.squeeze(-1) if c == 1 else grid, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        ax.axis("off")
    ax.set_title(title, fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()
