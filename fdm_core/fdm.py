"""The two changes FDM (Wu et al.) makes to a baseline process: the critically damped c_in and the warm-up.

The momentum-based forward process, at its critically damped solution, scales the input by
gamma = e^{-mB}(1 + mB), with B(t') = 0.1 t' + 9.95 t'^2 and t' linear in sigma over the network's range.
"""

from __future__ import annotations

import torch
from torch import Tensor

WARMUP_START = 5.0
# Below this net-input noise scale c_in(sigma) sigma the network cannot tell one noise sample from another.
BLIND_INPUT = 1e-3
WARMUP_RELEASE = 500.0


def damping_B(t: Tensor) -> Tensor:
    """B(t') = 0.1 t' + 9.95 t'^2, the integrated damping of the momentum process."""
    return 0.1 * t + 9.95 * t**2


def gamma(sigma: Tensor, sigma_min: float, sigma_max: float, multiplier: float) -> Tensor:
    """Critically damped kernel scale gamma(sigma) = e^{-mB}(1 + mB), computed in fp32 or wider."""
    dtype = torch.promote_types(sigma.dtype, torch.float32)
    t = (sigma.to(dtype) - sigma_min) / (sigma_max - sigma_min)
    mb = multiplier * damping_B(t)
    return torch.exp(-mb) * (1 + mb)


def warmup_cap(step: int, warmup_iters: int) -> float | None:
    """Loss-weight cap on the k-th optimizer step: 5 * 100^(k/W) until it passes 500, then None (uncapped)."""
    cap = WARMUP_START * 100.0 ** (step / warmup_iters)
    return None if cap > WARMUP_RELEASE else cap
