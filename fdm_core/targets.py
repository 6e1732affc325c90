"""Prediction parameterisations (x, eps, v) and loss weightings, all expressed in this sigma-space.

With x = x0 + sigma n the signal-to-noise ratio is SNR = 1/sigma^2. For an x0 estimate D:
eps_hat = (x - D)/sigma, so |eps_hat - eps|^2 = SNR |D - x0|^2; in the variance-preserving coordinates
z = x/sqrt(1+sigma^2), v = alpha eps - s x0 and |v_hat - v|^2 = (SNR + 1) |D - x0|^2 (Salimans & Ho §4).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fdm_core.options import Parameterisation, Weighting
from fdm_core.tensors import append_dims


def snr(sigma: Tensor) -> Tensor:
    return 1 / sigma**2


def weighting(name: Weighting, sigma: Tensor) -> Tensor:
    """x-space loss weight w(sigma): SNR, truncated SNR max(SNR, 1), SNR + 1, or 1."""
    if name == "snr":
        return snr(sigma)
    if name == "truncated_snr":
        return torch.clamp(snr(sigma), min=1.0)
    if name == "snr_plus_one":
        return snr(sigma) + 1
    if name == "constant":
        return torch.ones_like(sigma)
    raise ValueError(f"weighting: expected snr|truncated_snr|snr_plus_one|constant (got {name!r})")


def eps_target(x: Tensor, x0: Tensor, sigma: Tensor) -> Tensor:
    """The noise that turns x0 into x at sigma."""
    return (x - x0) / append_dims(sigma, x)


def v_target(x: Tensor, x0: Tensor, sigma: Tensor) -> Tensor:
    """v = alpha eps - s x0 with alpha = 1/sqrt(1+sigma^2), s = sigma/sqrt(1+sigma^2)."""
    s = append_dims(sigma, x)
    norm = torch.sqrt(1 + s**2)
    return (eps_target(x, x0, sigma) - s * x0) / norm


def x0_from(param: Parameterisation, pred: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
    """Turn a prediction in parameterisation `param` at (x, sigma) into the x0 estimate."""
    s = append_dims(sigma, x)
    if param == "x":
        return pred
    if param == "eps":
        return x - s * pred
    if param == "v":
        return x / (1 + s**2) - s / torch.sqrt(1 + s**2) * pred
    raise ValueError(f"parameterisation: expected x|eps|v (got {param!r})")


def head_coefficients(param: Parameterisation, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """(c_skip, c_out) of an output head predicting `param`: D = c_skip x + c_out F."""
    if param == "x":
        return torch.zeros_like(sigma), torch.ones_like(sigma)
    if param == "eps":
        return torch.ones_like(sigma), -sigma
    if param == "v":
        return 1 / (1 + sigma**2), -sigma / torch.sqrt(1 + sigma**2)
    raise ValueError(f"parameterisation: expected x|eps|v (got {param!r})")
