"""Distribution distances used to judge samples: sliced Wasserstein, MMD and the Frechet distance."""

from __future__ import annotations

import torch
from torch import Tensor


def sliced_wasserstein(a: Tensor, b: Tensor, n_projections: int = 256, seed: int = 0) -> float:
    """Mean over random unit directions of the 1-D Wasserstein-1 distance between projections."""
    a, b = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], n_projections, generator=g, dtype=torch.float64)
    dirs /= dirs.norm(dim=0, keepdim=True)
    n = min(a.shape[0], b.shape[0])
    q = torch.linspace(0, 1, n, dtype=torch.float64)
    pa = torch.quantile(a @ dirs, q, dim=0)
    pb = torch.quantile(b @ dirs, q, dim=0)
    return float((pa - pb).abs().mean())


def _sqrtm_psd(m: Tensor) -> Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(feats_a: Tensor, feats_b: Tensor) -> float:
    """|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) between Gaussian fits (float64)."""
    a, b = feats_a.double(), feats_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    root_a = _sqrtm_psd(s_a)
    cross = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp(min=0).sqrt().sum()
    return float(((mu_a - mu_b) ** 2).sum() + torch.trace(s_a) + torch.trace(s_b) - 2 * cross)
