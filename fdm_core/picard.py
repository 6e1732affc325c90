"""ParaDiGMS (Shih et al. 2023): Picard iteration over a sliding window of sampler steps
(docs/design.md: ParaDiGMS).

Every single-step sampler is x_{i+1} = x_i + Δ_i(x_i) + σ_up,i z_i (`samplers.step_delta`), so the whole
trajectory is the fixed point of x_{i+1} = x_0 + Σ_{k<=i} (Δ_k(x_k) + σ_up,k z_k). A Picard iteration
evaluates Δ for p guessed states at once (one batched call) and rebuilds them by a prefix sum; the window
slides past every state that moved by less than τ times the noise of the step leaving it.

`solver="anderson"` is ParaTAA's triangular Anderson acceleration (Tang et al., ICML 2024): the same fixed
point, error test and window, but the states the window keeps get a better next guess than the Picard map's.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor

from fdm_core.options import PICARD_TOL, PICARD_WINDOW, SINGLE_STEP_METHODS, SOLVERS, SingleStepMethod, Solver
from fdm_core.samplers import (
    Denoiser,
    _check_sigmas,
    ancestral_step,
    draw_noise,
    evals_per_step,
    noise_scales,
    step_delta,
)
from fdm_core.tensors import append_dims

# Δ for a batch of states with per-sample sigmas: (x_states, sigma_t, sigma_s, method) -> deltas.
Evaluator = Callable[[Tensor, Tensor, Tensor, SingleStepMethod], Tensor]


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
    solver: str = "picard"
    parallel_iterations: int = 0
    model_evaluations: int = 0
    strides: list[int] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)
    evaluate_seconds: float = 0.0  # in the evaluator's calls
    update_seconds: float = 0.0  # in the prefix sums, the error test and the solver's update


@torch.no_grad()
def parallel_sample(
    denoiser: Denoiser | None,
    x: Tensor,
    sigmas: Tensor,
    method: SingleStepMethod = "ddpm",
    window: int = PICARD_WINDOW,
    tol: float = PICARD_TOL,
    generator: torch.Generator | None = None,
    evaluator: Evaluator | None = None,
    solver: Solver = "picard",
    history: int = 1,
) -> tuple[Tensor, PicardStats]:
    """ParaDiGMS: the result of `samplers.sample(denoiser, x, sigmas, method, generator)` by Picard windows.

    `window` p states are evaluated per iteration, batched as p x batch samples with per-sample sigmas, by
    `evaluator` (default: one `step_delta` call on the local `denoiser`). p = 1 is the sequential sampler.
    `solver="anderson"` mixes the last `history` iterations into the guesses of the states the window keeps
    (`TriangularAnderson`); the states it slides past are the Picard map's, as in plain ParaDiGMS.
    """
    _check_sigmas(sigmas)
    if method not in SINGLE_STEP_METHODS:
        raise ValueError(
            f"method: {method!r} is not a single-step sampler, so Picard iteration would not reproduce it "
            f"(expected one of {', '.join(SINGLE_STEP_METHODS)})"
        )
    if window < 1:
        raise ValueError(f"window: must be >= 1 (got {window})")
    if not tol > 0:
        raise ValueError(f"tol: must be > 0 (got {tol})")
    if solver not in SOLVERS:
        raise ValueError(f"solver: {solver!r} is not one of {', '.join(SOLVERS)}")
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
    # Anderson's least squares in the error test's metric (steps without variance take the smallest one);
    # unweighted, the states at large σ would decide every mixing.
    weight = 1 / variance.clamp_min(variance[variance > 0].min() if bool((variance > 0).any()) else 1.0)

    buf = x.unsqueeze(0).repeat(n + 1, *([1] * x.ndim))  # B[0..N], every slot initialised to x_T
    stats = PicardStats(steps=n, window=window, tol=tol, solver=solver)
    anderson = TriangularAnderson(history) if solver == "anderson" else None
    errors = torch.full((n,), torch.nan, dtype=torch.float64, device=x.device)
    b = 0
    while b < n:
        e = min(b + window, n)
        p = e - b
        # 1. Δ of the p states B[b..e-1] in one batched call.
        t0 = time.perf_counter()
        delta = evaluator(
            buf[b:e].reshape(p * batch, *x.shape[1:]),
            sig_t[b:e].repeat_interleave(batch),
            sig_s[b:e].repeat_interleave(batch),
            method,
        )
        t1 = time.perf_counter()
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
        if anderson is not None:
            old = buf[b + 1 : e + 1].double()
            new[stride:] = anderson.update(b + 1, old, new - old, weight[b + 1 : e + 1])[stride:]
        buf[b + 1 : e + 1] = new.to(buf.dtype)
        errors[b:e] = ratio
        new_e = min(b + stride + window, n)
        buf[e : new_e + 1] = buf[e]
        b += stride

        stats.evaluate_seconds += t1 - t0
        stats.update_seconds += time.perf_counter() - t1
        stats.parallel_iterations += 1
        stats.model_evaluations += p * evals_per_step(method) - int(method == "heun" and e == n)
        stats.strides.append(stride)
    stats.errors = errors.tolist()
    return buf[n], stats


class TriangularAnderson:
    """ParaTAA's triangular Anderson acceleration of the window's fixed-point iteration X = G(X).

    With residual R = G(X) - X and the differences ΔX, ΔR of the last `history` + 1 iterations, state j's
    next guess is G(X)_j - Σ_m γ_jm (ΔX_m + ΔR_m)_j, where γ_j minimises Σ_{i<=j} w_i |R_i - Σ_m γ_jm ΔR_m,i|²
    (+ a small ridge): the system is triangular (state j depends on the states before it only), so state j's
    mixing sees only the residuals up to j. Per sample of the batch. At the fixed point R = 0, so γ = 0 and
    the guess is G(X) = X: the fixed point is unchanged. A state's history starts when it enters the window.
    """

    def __init__(self, history: int = 1, ridge: float = 1e-3) -> None:
        if history < 1:
            raise ValueError(f"history: must be >= 1 (got {history})")
        self.ridge = ridge
        self.memory: deque[tuple[int, Tensor, Tensor]] = deque(maxlen=history + 1)

    def update(self, start: int, x: Tensor, r: Tensor, weight: Tensor) -> Tensor:
        """The next guesses of the window's states B[start .. start + p - 1] (fp64, [p, batch, ...]), given
        their current values `x`, residuals `r` and each state's weight [p] in the least squares; the Picard
        map's x + r where no history exists yet."""
        p, batch = x.shape[:2]
        self.memory.append((start, x.reshape(p, batch, -1), r.reshape(p, batch, -1)))
        diffs = []  # (ΔX, ΔR) over the window's states, newest first; zero where a state has no history
        mem = list(self.memory)
        for (s0, x0, r0), (s1, x1, r1) in zip(mem[-2::-1], mem[:0:-1]):
            lo, hi = max(start, s0, s1), min(start + p, s0 + len(x0), s1 + len(x1))
            dx, dr = x.new_zeros(2, p, batch, x0.shape[-1]).unbind(0)
            if hi > lo:
                dx[lo - start : hi - start] = x1[lo - s1 : hi - s1] - x0[lo - s0 : hi - s0]
                dr[lo - start : hi - start] = r1[lo - s1 : hi - s1] - r0[lo - s0 : hi - s0]
            diffs.append((dx, dr))
        guess = x + r
        if not diffs:
            return guess
        dx = torch.stack([d[0] for d in diffs])  # [m, p, batch, D]
        dr = torch.stack([d[1] for d in diffs])
        rf = r.reshape(p, batch, -1)
        w = weight.to(dr)
        gram = torch.einsum("p,mpbd,npbd->pbmn", w, dr, dr).cumsum(0)  # Σ_{i<=j} w_i ΔR_i ΔR_i^T
        rhs = torch.einsum("p,mpbd,pbd->pbm", w, dr, rf).cumsum(0)
        m = gram.shape[-1]
        scale = gram.diagonal(dim1=-2, dim2=-1).amax(-1, keepdim=True).unsqueeze(-1)
        eye = torch.eye(m, dtype=gram.dtype, device=gram.device)
        # A state whose history is shorter has zero rows there: the ridge keeps the system solvable and
        # sets those coefficients to 0 (and all of them to 0 where no state up to j has any history).
        gamma = torch.linalg.solve(gram + (self.ridge * scale + torch.finfo(gram.dtype).tiny) * eye, rhs)
        mix = torch.einsum("pbm,mpbd->pbd", gamma, dx + dr)
        # Safeguard (Zhang, O'Donoghue & Boyd, SIAM J. Optim. 2020): mix only where the residual up to j
        # shrank since the last iteration; where it grew (the transient growth of Picard on a triangular
        # system, or the window's start having moved), the least squares would undo the step: keep G(X).
        now = torch.einsum("p,pbd->pb", w, rf.pow(2)).cumsum(0)
        before = torch.einsum("p,pbd->pb", w, (rf - dr[0]).pow(2)).cumsum(0)
        mix = torch.where((now < before).unsqueeze(-1), mix, 0.0)
        return guess - mix.reshape(guess.shape)
