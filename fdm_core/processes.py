"""Noise processes VP, VE and EDM in sigma-space, with EDM-style preconditioning and their FDM variants.

Every process lives in the unscaled space x = x0 + sigma * n (docs/design.md: The math). A process knows its
sigma range, its preconditioning coefficients, how training draws sigma and how the loss is weighted. FDM
changes exactly two things: c_in becomes the critically damped kernel scale gamma(sigma), and the loss weight
is capped during a warm-up (see `fdm_core.fdm`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fdm_core import fdm
from fdm_core.options import ProcessName

VP_BETA_MIN = 0.1
VP_BETA_D = 19.9
VP_T_MIN = 1e-5


def vp_sigma(t: Tensor | float) -> Tensor:
    """sigma_vp(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.sqrt(torch.expm1(0.5 * VP_BETA_D * t**2 + VP_BETA_MIN * t))


def vp_sigma_inv(sigma: Tensor) -> Tensor:
    """The t with sigma_vp(t) = sigma: the positive root of beta_d t^2/2 + beta_min t - ln(1+sigma^2) = 0."""
    s = sigma.to(torch.float64)
    t = (torch.sqrt(VP_BETA_MIN**2 + 2 * VP_BETA_D * torch.log1p(s**2)) - VP_BETA_MIN) / VP_BETA_D
    return t.to(sigma.dtype)


@dataclass(frozen=True)
class Process:
    """A diffusion process with its preconditioning; `fdm=True` gives its Fast Diffusion Model variant."""

    name: ProcessName
    sigma_min: float
    sigma_max: float
    sigma_data: float = 0.5
    fdm: bool = False
    multiplier: float = 2.0
    warmup_iters: int = 200
    # A distilled student of an FDM model: where gamma(sigma) sigma < fdm.BLIND_INPUT (sigma near sigma_max
    # under EDM: gamma(80) ~ 4e-8) its c_in is the baseline's, so the network sees the x it steps from.
    see_input: bool = False

    def __post_init__(self) -> None:
        if self.name == "ve" and self.fdm and self.multiplier != 1.0:
            raise ValueError(f"multiplier: VE-FDM uses m = 1 (got {self.multiplier})")
        if self.multiplier <= 0:
            raise ValueError(f"multiplier: must be > 0 (got {self.multiplier})")
        if self.warmup_iters < 1:
            raise ValueError(f"warmup_iters: must be >= 1 (got {self.warmup_iters})")

    # --- preconditioning D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) -------------------------
    def c_skip(self, sigma: Tensor) -> Tensor:
        if self.name == "edm":
            return self.sigma_data**2 / (sigma**2 + self.sigma_data**2)
        return torch.ones_like(sigma)

    def c_out(self, sigma: Tensor) -> Tensor:
        if self.name == "edm":
            return sigma * self.sigma_data / torch.sqrt(sigma**2 + self.sigma_data**2)
        if self.name == "vp":
            return -sigma
        return sigma

    def c_in(self, sigma: Tensor) -> Tensor:
        if self.fdm:
            g = fdm.gamma(sigma, self.sigma_min, self.sigma_max, self.multiplier)
            if not self.see_input:
                return g
            return torch.where(g * sigma < fdm.BLIND_INPUT, self._baseline_c_in(sigma).to(g.dtype), g)
        return self._baseline_c_in(sigma)

    def _baseline_c_in(self, sigma: Tensor) -> Tensor:
        if self.name == "edm":
            return 1 / torch.sqrt(sigma**2 + self.sigma_data**2)
        if self.name == "vp":
            return 1 / torch.sqrt(sigma**2 + 1)
        return torch.ones_like(sigma)

    def c_noise(self, sigma: Tensor) -> Tensor:
        if self.name == "edm":
            return torch.log(sigma) / 4
        if self.name == "vp":
            return 999 * vp_sigma_inv(sigma)
        return torch.log(sigma / 2)

    # --- training ------------------------------------------------------------------------------
    def sample_sigma(self, n: int, generator: torch.Generator | None = None, device: str = "cpu") -> Tensor:
        """Training sigmas: EDM log-normal, VP uniform in t, VE log-uniform."""
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        if self.name == "edm":
            z = torch.randn(n, generator=generator, device=device, dtype=torch.float64)
            sigma = torch.exp(-1.2 + 1.2 * z)
        elif self.name == "vp":
            sigma = vp_sigma(VP_T_MIN + (1 - VP_T_MIN) * u)
        else:
            sigma = self.sigma_min * (self.sigma_max / self.sigma_min) ** u
        return sigma.to(torch.float32)

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """lambda(sigma) of the baseline: EDM's (sigma^2+sd^2)/(sigma sd)^2, VP and VE 1/sigma^2."""
        if self.name == "edm":
            return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        return 1 / sigma**2

    def training_weight(self, sigma: Tensor, warmup_step: int) -> Tensor:
        """lambda(sigma), capped by the FDM warm-up on the k-th optimizer step when FDM is on."""
        w = self.loss_weight(sigma)
        if self.fdm:
            cap = fdm.warmup_cap(warmup_step, self.warmup_iters)
            if cap is not None:
                w = torch.clamp(w, max=cap)
        return w


DEFAULT_RANGES: dict[str, tuple[float, float]] = {
    "edm": (0.002, 80.0),
    "vp": (float(vp_sigma(VP_T_MIN)), float(vp_sigma(1.0))),
    "ve": (0.02, 100.0),
}

DEFAULT_WARMUP = {"edm": 200, "vp": 400, "ve": 400}


def make_process(
    name: ProcessName,
    fdm: bool = False,
    multiplier: float | None = None,
    warmup_iters: int | None = None,
    sigma_data: float = 0.5,
) -> Process:
    """The process `name` with its default sigma range; FDM defaults: m = 2 (VE: 1), W = 200 (EDM) or 400."""
    if name not in DEFAULT_RANGES:
        raise ValueError(f"process: expected one of vp|ve|edm (got {name!r})")
    sigma_min, sigma_max = DEFAULT_RANGES[name]
    if multiplier is None:
        multiplier = 1.0 if name == "ve" else 2.0
    return Process(
        name=name,
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        sigma_data=sigma_data,
        fdm=fdm,
        multiplier=multiplier,
        warmup_iters=warmup_iters or DEFAULT_WARMUP[name],
    )


def log_snr(sigma: Tensor) -> Tensor:
    """log SNR = -2 log sigma in this space (SNR = 1/sigma^2)."""
    return -2 * torch.log(sigma)


__all__ = ["DEFAULT_RANGES", "Process", "ProcessName", "log_snr", "make_process", "vp_sigma", "vp_sigma_inv"]
