"""ParaDiGMS (Shih et al. 2023): Picard iteration over a sliding window of sampler steps (DESIGN.md §5).

Every single-step sampler is x_{i+1} = x_i + Δ_i(x_i) + σ_up,i z_i (`samplers.step_delta`), so the whole
trajectory is the fixed point of x_{i+1} = x_0 + Σ_{k<=i} (Δ_k(x_k) + σ_up,k z_k). A Picard iteration
evaluates Δ for p guessed states at once (one batched call) and rebuilds them by a prefix sum; the window
slides past every state that moved by less than τ times the noise of the step leaving it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor

from fdm_core.samplers import (
    Denoiser,
    Method,
    _check_sigmas,
    ancestral_step,
    draw_noise,
    evals_per_step,
    noise_scales,
    step_delta,
)
from fdm_core.tensors import append_dims

# Δ for a batch of states with per-sample sigmas: (x_states, sigma_t, sigma_s, method) -> deltas.
Evaluator = Callable[[Tensor, Tensor, Tensor, Method], Tensor]
PICARD_METHODS: tuple[str, ...] = ("euler", "heun", "ddpm")


@dataclass
class PicardStats:
    """Cost and convergence of one Picard run.

    `model_evaluations` counts denoiser evaluations of one state of the batch (the unit of the sequential
    sampler's `nfe`): Σ window lengths, twice for Heun except on the step to σ = 0, which takes no
    correction (the batched call computes one there anyway and discards it). `errors[i - 1]` is state i's
    error ratio when the window last moved it (max over the batch, to compare with τ²): ≤ τ² for every state
    the window slid past, > τ² only where a stride ended on a failing state, which then started the next
    window (computed from a converged prefix); the final state leaves no step (variance 0, ratio ∞), so it
    cannot shorten a stride.
    """

    steps: int
    window: int
    tol: float
    parallel_iterations: int = 0
    model_evaluations: int = 0
    strides: list[int] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)


@torch.no_grad()
def picard_sample(
    denoiser: Denoiser | None,
    x: Tensor,
    sigmas: Tensor,
    method: Method = "ddpm",
    window: int = 64,
    tol: float = 0.1,
    generator: torch.Generator | None = None,
    evaluator: Evaluator | None = None,
) -> tuple[Tensor, PicardStats]:
    """ParaDiGMS: the result of `samplers.sample(denoiser, x, sigmas, method, generator)` by Picard windows.

    `window` p states are evaluated per iteration, batched as p x batch samples with per-sample sigmas, by
    `evaluator` (default: one `step_delta` call on the local `denoiser`). p = 1 is the sequential sampler.
    """
    _check_sigmas(sigmas)
    if method not in PICARD_METHODS:
        raise ValueError(
            f"method: {method!r} is not a single-step sampler, so Picard iteration would not reproduce it "
            f"(expected one of {', '.join(PICARD_METHODS)})"
        )
    if window < 1:
        raise ValueError(f"window: must be >= 1 (got {window})")
    if not tol > 0:
        raise ValueError(f"tol: must be > 0 (got {tol})")
    if evaluator is None:
        if denoiser is None:
            raise ValueError("denoiser: needed when no evaluator is given")
        evaluator = partial(step_delta, denoiser)

    n, batch = len(sigmas) - 1, x.shape[0]
    dim = x[0].numel()
    s64 = sigmas.to(device=x.device, dtype=torch.float64)
    sig_t, sig_s = s64[:-1], s64[1:]
    noise = draw_noise(x, sigmas, method, generator)
    kicks = None  # σ_up,i z_i of every step, in fp64 for the prefix sums
    if noise is not None:
        z = noise.double()
        kicks = append_dims(noise_scales(s64, method), z) * z
    # Tolerance scale of state i: the DDPM (η = 1) variance of the step leaving it, for every method;
    # the final state leaves no step, so its variance is 0 and its ratio ∞.
    variance = torch.cat([ancestral_step(sig_t, sig_s)[0] ** 2, s64.new_zeros(1)])

    buf = x.unsqueeze(0).repeat(n + 1, *([1] * x.ndim))  # B[0..N], every slot initialised to x_T
    stats = PicardStats(steps=n, window=window, tol=tol)
    errors = torch.full((n,), torch.nan, dtype=torch.float64, device=x.device)
    b = 0
    while b < n:
        e = min(b + window, n)
        p = e - b
        # 1. Δ of the p states B[b..e-1] in one batched call.
        delta = evaluator(
            buf[b:e].reshape(p * batch, *x.shape[1:]),
            sig_t[b:e].repeat_interleave(batch),
            sig_s[b:e].repeat_interleave(batch),
            method,
        )
        # 2. new_j = B[b] + Σ_{k<=j} Δ_{b+k} + Σ_{k<=j} σ_up,b+k z_{b+k}, for B[b+1..e].
        new = buf[b].double() + delta.reshape(p, *x.shape).double().cumsum(0)
        if kicks is not None:
            new = new + kicks[b:e].cumsum(0)
        # 3. error_j = |new_j - B_old[b+1+j]|^2 / (D σ^2_{b+1+j}), the worst sample of the batch.
        sq = (new - buf[b + 1 : e + 1].double()).reshape(p, batch, -1).pow(2).sum(-1) / dim
        ratio = torch.where(sq == 0, 0.0, sq / append_dims(variance[b + 1 : e + 1], sq)).amax(1)
        fails = ratio > tol**2
        # 4. Slide past the converged prefix (a failing final state still lets the window reach N);
        # newly exposed slots start from the window's last state.
        first_fail = int(fails.nonzero()[0]) if bool(fails.any()) else p
        stride = min(1 + first_fail, p)
        buf[b + 1 : e + 1] = new.to(buf.dtype)
        errors[b:e] = ratio
        new_e = min(b + stride + window, n)
        buf[e : new_e + 1] = buf[e]
        b += stride

        stats.parallel_iterations += 1
        stats.model_evaluations += p * evals_per_step(method) - int(method == "heun" and e == n)
        stats.strides.append(stride)
    stats.errors = errors.tolist()
    return buf[n], stats
