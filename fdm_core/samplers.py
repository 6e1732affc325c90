"""Samplers with one signature: `sample(denoiser, x, sigmas, method, generator=None)` (k-diffusion style).

`denoiser(x, sigma)` returns the x0 estimate for a per-sample `sigma` of shape [batch]; `sigmas` is
decreasing and ends at 0; `x` is already scaled by `sigmas[0]`. The probability-flow ODE is
dx/dsigma = (x - D(x, sigma))/sigma, so deterministic DDIM is exactly Euler on it.

Each single-step method is written as x_{i+1} = x_i + step_delta(x_i) + sigma_up_i * z_i so that the
ParaDiGMS sampler (`fdm_core.picard`) reuses the very same step, batched over a window of steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from fdm_core.options import METHODS, SINGLE_STEP_METHODS, Method
from fdm_core.processes import VP_T_MIN, Process, vp_sigma, vp_sigma_inv
from fdm_core.tensors import append_dims

Denoiser = Callable[[Tensor, Tensor], Tensor]
GridKind = Literal["karras", "vp", "ve"]
STOCHASTIC = frozenset({"ddpm"})


# --- sigma grids ---------------------------------------------------------------------------------
def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, then 0."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def get_sigmas_vp(n: int, t_min: float = 1e-3, t_max: float = 1.0) -> Tensor:
    """VP grid: uniform in t from t_max down to t_min (EDM's VP sampler uses t_min = 1e-3), then 0."""
    t = torch.linspace(t_max, t_min, n, dtype=torch.float64) if n > 1 else torch.tensor([t_max])
    return _append_zero(vp_sigma(t))


def get_sigmas_ve(n: int, sigma_min: float = 0.02, sigma_max: float = 100.0) -> Tensor:
    """VE grid: geometric from sigma_max down to sigma_min, then 0."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    return _append_zero(sigma_max * (sigma_min / sigma_max) ** ramp)


def get_sigmas(
    kind: GridKind,
    n: int,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
) -> Tensor:
    """A decreasing grid of `n` positive sigmas followed by 0 (n steps), as float64."""
    if n < 1:
        raise ValueError(f"steps: must be >= 1 (got {n})")
    if kind == "karras":
        return get_sigmas_karras(n, sigma_min or 0.002, sigma_max or 80.0, rho)
    if kind == "vp":
        t_min = 1e-3 if sigma_min is None else max(float(vp_sigma_inv(torch.tensor(sigma_min))), VP_T_MIN)
        t_max = 1.0 if sigma_max is None else float(vp_sigma_inv(torch.tensor(sigma_max)))
        return get_sigmas_vp(n, t_min, t_max)
    if kind == "ve":
        return get_sigmas_ve(n, sigma_min or 0.02, sigma_max or 100.0)
    raise ValueError(f"grid: expected karras|vp|ve (got {kind!r})")


def _append_zero(s: Tensor) -> Tensor:
    return torch.cat([s, s.new_zeros(1)])


# --- shared step helpers -------------------------------------------------------------------------
def to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """ODE derivative dx/dsigma = (x - D)/sigma."""
    return (x - denoised) / append_dims(sigma, x)


def ancestral_step(sigma_t: Tensor, sigma_s: Tensor) -> tuple[Tensor, Tensor]:
    """DDPM (eta = 1): sigma_up = sqrt(s^2 (t^2 - s^2)/t^2), sigma_down = sqrt(s^2 - sigma_up^2)."""
    up = torch.sqrt(torch.clamp(sigma_s**2 * (sigma_t**2 - sigma_s**2) / sigma_t**2, min=0))
    down = torch.sqrt(torch.clamp(sigma_s**2 - up**2, min=0))
    return up, down


def step_delta(denoiser: Denoiser, x: Tensor, sigma_t: Tensor, sigma_s: Tensor, method: Method) -> Tensor:
    """The deterministic part of one step from sigma_t to sigma_s, per sample (sigmas of shape [batch])."""
    denoised = denoiser(x, sigma_t)
    d = to_d(x, sigma_t, denoised)
    if method == "euler":
        return append_dims(sigma_s - sigma_t, x) * d
    if method == "ddpm":
        _, down = ancestral_step(sigma_t, sigma_s)
        return append_dims(down - sigma_t, x) * d
    if method == "heun":
        dt = append_dims(sigma_s - sigma_t, x)
        x_euler = x + dt * d
        last = sigma_s == 0
        if bool(last.all()):
            return dt * d
        # Heun's correction everywhere but on the step to sigma = 0 (where D(x, 0) is undefined).
        s_safe = torch.where(last, sigma_t, sigma_s)
        d2 = to_d(x_euler, s_safe, denoiser(x_euler, s_safe))
        d_avg = torch.where(append_dims(last, x).bool(), d, (d + d2) / 2)
        return dt * d_avg
    raise ValueError(f"method: {method!r} has no single-step form (expected euler|heun|ddpm)")


def noise_scales(sigmas: Tensor, method: Method) -> Tensor:
    """sigma_up of every step (0 for deterministic methods), as float64 of shape [n_steps]."""
    s = sigmas.to(torch.float64)
    if method in STOCHASTIC:
        return ancestral_step(s[:-1], s[1:])[0]
    return torch.zeros(len(s) - 1, dtype=torch.float64)


def draw_noise(x: Tensor, sigmas: Tensor, method: Method, generator: torch.Generator | None) -> Tensor | None:
    """All of a stochastic sampler's noise, drawn up front: one tensor per step, in step order."""
    if method not in STOCHASTIC:
        return None
    n = len(sigmas) - 1
    z = torch.randn((n, *x.shape), generator=generator, device="cpu", dtype=torch.float32)
    return z.to(device=x.device, dtype=x.dtype)


def evals_per_step(method: Method) -> int:
    return 2 if method == "heun" else 1


def nfe(method: Method, steps: int) -> int:
    """Model evaluations of a sequential run: Heun skips its correction on the final step."""
    return 2 * steps - 1 if method == "heun" else steps


# --- the samplers --------------------------------------------------------------------------------
@torch.no_grad()
def sample(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    method: Method = "heun",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Integrate from sigmas[0] to 0 with `method`: euler (= DDIM), heun, ddpm (eta = 1) or dpmpp_2m."""
    _check_sigmas(sigmas)
    if method == "dpmpp_2m":
        return _sample_dpmpp_2m(denoiser, x, sigmas)
    if method not in SINGLE_STEP_METHODS:
        raise ValueError(f"method: expected one of {', '.join(METHODS)} (got {method!r})")
    noise = draw_noise(x, sigmas, method, generator)
    ups = noise_scales(sigmas, method)
    b = x.shape[0]
    for i in range(len(sigmas) - 1):
        sigma_t = torch.full((b,), float(sigmas[i]), device=x.device, dtype=torch.float64)
        sigma_s = torch.full((b,), float(sigmas[i + 1]), device=x.device, dtype=torch.float64)
        x = x + step_delta(denoiser, x, sigma_t, sigma_s, method)
        if noise is not None:
            x = x + float(ups[i]) * noise[i]
    return x


def _sample_dpmpp_2m(denoiser: Denoiser, x: Tensor, sigmas: Tensor) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022) in log-sigma time, as in k-diffusion."""
    b = x.shape[0]
    old_denoised = None
    for i in range(len(sigmas) - 1):
        s_t, s_s = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoiser(x, torch.full((b,), s_t, device=x.device, dtype=torch.float64))
        if s_s == 0:
            x = denoised
            break
        h = math.log(s_t) - math.log(s_s)
        if old_denoised is None:
            d_est = denoised
        else:
            h_last = math.log(float(sigmas[i - 1])) - math.log(s_t)
            r = h_last / h
            d_est = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (s_s / s_t) * x - math.expm1(-h) * d_est
        old_denoised = denoised
    return x


def _check_sigmas(sigmas: Tensor) -> None:
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError("sigmas: expected a 1-D grid of at least two values ending in 0")
    if float(sigmas[-1]) != 0.0:
        raise ValueError(f"sigmas: must end at 0 (got {float(sigmas[-1])})")
    if not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError("sigmas: must be strictly decreasing")


def process_grid(process: Process, n: int) -> Tensor:
    """The grid each process is sampled on by default: EDM Karras, VP uniform-t, VE geometric."""
    if process.name == "edm":
        return get_sigmas("karras", n, process.sigma_min, process.sigma_max)
    if process.name == "vp":
        return get_sigmas("vp", n)
    return get_sigmas("ve", n, process.sigma_min, process.sigma_max)
