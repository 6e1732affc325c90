"""Gaussian data x0 ~ N(mu, s^2 I): the exact denoiser and the exact probability-flow ODE solution.

The known answers every sampler, Picard and distillation test is checked against (docs/design.md: The math).
"""

from __future__ import annotations

from torch import Tensor


class GaussianDenoiser:
    """D(x, sigma) = mu + s^2/(s^2 + sigma^2) (x - mu); counts its calls and evaluated samples."""

    def __init__(self, mu: float = 0.0, s: float = 0.5) -> None:
        self.mu, self.s = mu, s
        self.calls = 0
        self.evaluated = 0

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        self.calls += 1
        self.evaluated += x.shape[0]
        sig = sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return self.mu + self.s**2 / (self.s**2 + sig**2) * (x - self.mu)

    def ode_solution(self, x_start: Tensor, sigma_start: float, sigma_end: float) -> Tensor:
        """x(sigma) = mu + (x(sigma_max) - mu) sqrt((s^2 + sigma^2)/(s^2 + sigma_max^2))."""
        ratio = ((self.s**2 + sigma_end**2) / (self.s**2 + sigma_start**2)) ** 0.5
        return self.mu + (x_start - self.mu) * ratio
