"""Samplers against the closed-form Gaussian answers of docs/design.md."""

import math

import pytest
import torch

from fdm_core.analytic import GaussianDenoiser
from fdm_core.samplers import get_sigmas, nfe, sample, step_delta

MU, S = 0.3, 0.5


def _final_error(method: str, steps: int) -> float:
    den = GaussianDenoiser(MU, S)
    sigmas = get_sigmas("karras", steps, 0.002, 80.0)
    x0 = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80.0
    out = sample(den, x0, sigmas, method)
    exact = den.ode_solution(x0, 80.0, 0.0)
    return float((out - exact).abs().max() / (x0 - MU).abs().max())


@pytest.mark.parametrize(("method", "order"), [("euler", 1), ("heun", 2), ("dpmpp_2m", 2)])
def test_ode_samplers_converge_at_their_order(method: str, order: int) -> None:
    errs = [_final_error(method, n) for n in (32, 64, 128)]
    slopes = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    assert errs[-1] < errs[0]
    for slope in slopes:
        assert slope == pytest.approx(order, abs=0.35), (errs, slopes)


def test_heun_is_far_more_accurate_than_euler_at_equal_steps() -> None:
    assert _final_error("heun", 32) < 0.25 * _final_error("euler", 32)


def test_ddpm_reproduces_data_mean_and_variance() -> None:
    den = GaussianDenoiser(MU, S)
    sigmas = get_sigmas("karras", 400, 0.002, 80.0)
    g = torch.Generator().manual_seed(1)
    n = 20000
    x = torch.randn(n, 2, generator=g, dtype=torch.float64) * 80.0
    out = sample(den, x, sigmas, "ddpm", generator=g)
    se_mean = S / math.sqrt(2 * n)
    assert abs(float(out.mean()) - MU) < 5 * se_mean
    assert float(out.var()) == pytest.approx(S**2, rel=0.04)


def test_ddpm_same_seed_same_samples_and_noise_is_drawn_up_front() -> None:
    den = GaussianDenoiser(MU, S)
    sigmas = get_sigmas("karras", 10, 0.002, 80.0)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(3)) * 80
    a = sample(den, x, sigmas, "ddpm", generator=torch.Generator().manual_seed(7))
    b = sample(den, x, sigmas, "ddpm", generator=torch.Generator().manual_seed(7))
    c = sample(den, x, sigmas, "ddpm", generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("method", ["euler", "heun", "ddpm"])
def test_step_accepts_per_sample_sigma(method: str) -> None:
    den = GaussianDenoiser(MU, S)
    x = torch.randn(4, 2, dtype=torch.float64)
    sigma_t = torch.tensor([10.0, 3.0, 1.0, 0.5], dtype=torch.float64)
    sigma_s = torch.tensor([3.0, 1.0, 0.5, 0.0], dtype=torch.float64)
    batched = step_delta(den, x, sigma_t, sigma_s, method)
    for i in range(4):
        one = step_delta(den, x[i : i + 1], sigma_t[i : i + 1], sigma_s[i : i + 1], method)
        torch.testing.assert_close(batched[i : i + 1], one)


def test_grids_are_decreasing_and_end_at_zero() -> None:
    for kind in ("karras", "vp", "ve"):
        s = get_sigmas(kind, 18)
        assert len(s) == 19 and float(s[-1]) == 0.0
        assert bool((s[1:] < s[:-1]).all())
    k = get_sigmas("karras", 5, 0.002, 80.0)
    assert float(k[0]) == pytest.approx(80.0) and float(k[4]) == pytest.approx(0.002)
    ve = get_sigmas("ve", 3)
    assert float(ve[1]) == pytest.approx(math.sqrt(0.02 * 100.0))


def test_bad_grid_is_refused() -> None:
    den = GaussianDenoiser()
    with pytest.raises(ValueError, match="end at 0"):
        sample(den, torch.zeros(1, 2), torch.tensor([2.0, 1.0]), "euler")
    with pytest.raises(ValueError, match="method"):
        sample(den, torch.zeros(1, 2), torch.tensor([2.0, 0.0]), "rk45")


def test_nfe_accounting() -> None:
    den = GaussianDenoiser()
    sample(den, torch.randn(2, 2) * 80, get_sigmas("karras", 12), "heun")
    assert den.calls == nfe("heun", 12) == 23
