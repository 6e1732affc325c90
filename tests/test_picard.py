"""ParaDiGMS Picard sampling against the sequential sampler, on the exact Gaussian denoiser
(docs/design.md: ParaDiGMS)."""

import math
from itertools import accumulate

import pytest
import torch

from fdm_core.analytic import GaussianDenoiser
from fdm_core.picard import parallel_sample
from fdm_core.samplers import get_sigmas, nfe, sample, step_delta

MU, S = 0.3, 0.5
STEPS = {"euler": 64, "heun": 32, "ddpm": 200}


def _setup(method: str, batch: int = 16, dtype: torch.dtype = torch.float64):
    sigmas = get_sigmas("karras", STEPS[method], 0.002, 80.0)
    x = torch.randn(batch, 4, generator=torch.Generator().manual_seed(0), dtype=dtype) * 80.0
    return GaussianDenoiser(MU, S), x, sigmas


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(1)


@pytest.mark.parametrize("method", ["euler", "heun", "ddpm"])
@pytest.mark.parametrize("tol", [0.1, 0.01])
def test_picard_lands_within_tolerance_of_sequential(method: str, tol: float) -> None:
    den, x, sigmas = _setup(method)
    ref = sample(den, x, sigmas, method, _gen())
    out, stats = parallel_sample(den, x, sigmas, method, window=16, tol=tol, generator=_gen())
    # Every accepted state moved by < tol x the noise of its step; the flow carries that to < tol x s.
    assert float((out - ref).abs().max()) < tol * S
    assert stats.parallel_iterations < len(sigmas) - 1


@pytest.mark.parametrize("method", ["euler", "heun", "ddpm"])
def test_window_one_is_the_sequential_sampler(method: str) -> None:
    den, x, sigmas = _setup(method)
    ref = sample(den, x, sigmas, method, _gen())
    out, stats = parallel_sample(den, x, sigmas, method, window=1, generator=_gen())
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert stats.parallel_iterations == len(sigmas) - 1
    assert stats.model_evaluations == nfe(method, len(sigmas) - 1)


def test_window_one_in_float32_matches_to_rounding() -> None:
    den, x, sigmas = _setup("ddpm", dtype=torch.float32)
    ref = sample(den, x, sigmas, "ddpm", _gen())
    out, _ = parallel_sample(den, x, sigmas, "ddpm", window=1, generator=_gen())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * S)


@pytest.mark.parametrize(("method", "window"), [("euler", 8), ("heun", 5), ("ddpm", 32)])
def test_stats_add_up_and_each_iteration_is_one_batched_call(method: str, window: int) -> None:
    den, x, sigmas = _setup(method)
    n, batch = len(sigmas) - 1, x.shape[0]
    _, stats = parallel_sample(den, x, sigmas, method, window=window, generator=_gen())
    starts = [0, *accumulate(stats.strides)][:-1]
    lengths = [min(window, n - b) for b in starts]
    assert sum(stats.strides) == n
    assert all(1 <= s <= window for s in stats.strides)
    assert stats.parallel_iterations == len(stats.strides) < n
    per_call = 2 if method == "heun" else 1  # Heun's corrector is a second batched call ...
    no_corrector = int(method == "heun" and lengths[-1] == 1)  # ... except on the step to sigma = 0 alone
    assert den.calls == per_call * stats.parallel_iterations - no_corrector
    assert den.evaluated == (per_call * sum(lengths) - no_corrector) * batch
    # Heun skips its correction on the step to sigma = 0 (in every window reaching it), as the sequential nfe.
    final_steps = sum(b + length == n for b, length in zip(starts, lengths))
    assert stats.model_evaluations == per_call * sum(lengths) - (method == "heun") * final_steps


def test_whole_trajectory_in_one_window_with_infinite_tolerance_is_one_iteration() -> None:
    den, x, sigmas = _setup("euler")
    n = len(sigmas) - 1
    out, stats = parallel_sample(den, x, sigmas, "euler", window=n + 10, tol=math.inf)
    assert (stats.parallel_iterations, stats.model_evaluations, stats.strides) == (1, n, [n])
    # One Picard iteration from x_T everywhere: x_N = x_T + Σ_i (σ_{i+1} - σ_i)(x_T - D(x_T, σ_i))/σ_i.
    expected = x.clone()
    for sigma_t, sigma_s in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        denoised = den(x, torch.full((x.shape[0],), sigma_t))
        expected += (sigma_s - sigma_t) * (x - denoised) / sigma_t
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("method", ["euler", "ddpm"])
def test_every_state_moved_less_than_tolerance_unless_a_window_started_there(method: str) -> None:
    den, x, sigmas = _setup(method)
    tol = 0.1
    _, stats = parallel_sample(den, x, sigmas, method, window=16, tol=tol, generator=_gen())
    starts = set(accumulate(stats.strides))
    assert len(stats.errors) == len(sigmas) - 1
    assert stats.errors[-1] == math.inf  # the final state has no step leaving it
    assert {i + 1 for i, e in enumerate(stats.errors) if not e <= tol**2} <= starts
    assert sum(e <= tol**2 for e in stats.errors) > len(stats.errors) // 2


def test_rejects_multistep_solver_and_bad_arguments() -> None:
    den, x, sigmas = _setup("euler")
    with pytest.raises(ValueError, match="dpmpp_2m"):
        parallel_sample(den, x, sigmas, "dpmpp_2m")
    with pytest.raises(ValueError, match="window"):
        parallel_sample(den, x, sigmas, "euler", window=0)
    with pytest.raises(ValueError, match="tol"):
        parallel_sample(den, x, sigmas, "euler", tol=0)
    with pytest.raises(ValueError, match="denoiser"):
        parallel_sample(None, x, sigmas, "euler")


def test_custom_evaluator_receives_stacked_window_with_per_sample_sigmas() -> None:
    den, x, sigmas = _setup("euler", batch=3)
    seen = []

    def evaluator(xs, sigma_t, sigma_s, method):
        seen.append((xs.shape[0], sigma_t.clone(), sigma_s.clone()))
        return step_delta(den, xs, sigma_t, sigma_s, method)

    ref, _ = parallel_sample(den, x, sigmas, "euler", window=4)
    out, _ = parallel_sample(None, x, sigmas, "euler", window=4, evaluator=evaluator)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    size, sigma_t, sigma_s = seen[0]
    assert size == 4 * 3
    # Positions stacked along the batch: p blocks of the batch, each with its step's sigmas.
    assert torch.equal(sigma_t, sigmas[:4].repeat_interleave(3))
    assert torch.equal(sigma_s, sigmas[1:5].repeat_interleave(3))
