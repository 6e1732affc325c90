"""The FDM denoisers and loss against the reference formulation (sail-sg/FDM's FDM_*Precond and losses, as
docs/design.md: The math writes them), written out here independently: D(x, σ) = c_skip·x + c_out·F(γ(σ)·x,
c_noise) with γ = e^{-mB}(1 + mB), B = β_min·t' + ½β_d·t'², t' = (σ − σ_min)/(σ_max − σ_min) of the network's
own range, and the loss weight capped at 5·100^{k/W} on the k-th step. Issue 15 asked whether VP-FDM's lag on
digits is a defect of the port: these pin every coefficient the VP-FDM network and loss see."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from fdm_core.precond import Denoiser
from fdm_core.processes import make_process
from fdm_core.training import denoising_loss

BETA_MIN, BETA_D = 0.1, 19.9


def vp_sigma(t: float) -> float:
    return math.sqrt(math.exp(0.5 * BETA_D * t * t + BETA_MIN * t) - 1)


def vp_t(sigma: float) -> float:
    return (math.sqrt(BETA_MIN**2 + 2 * BETA_D * math.log(1 + sigma * sigma)) - BETA_MIN) / BETA_D


# name: (sigma_min, sigma_max, m, c_skip, c_out, c_noise) of the reference FDM preconditioning.
SD = 0.5
REFERENCE = {
    "vp": (
        vp_sigma(1e-5),
        vp_sigma(1.0),
        2.0,
        lambda s: 1.0,
        lambda s: -s,
        lambda s: 999 * vp_t(s),
    ),
    "ve": (0.02, 100.0, 1.0, lambda s: 1.0, lambda s: s, lambda s: math.log(0.5 * s)),
    "edm": (
        0.002,
        80.0,
        2.0,
        lambda s: SD**2 / (s * s + SD**2),
        lambda s: s * SD / math.sqrt(s * s + SD**2),
        lambda s: math.log(s) / 4,
    ),
}


def reference_gamma(sigma: float, sigma_min: float, sigma_max: float, m: float) -> float:
    t = (sigma - sigma_min) / (sigma_max - sigma_min)
    mb = m * (BETA_MIN * t + 0.5 * BETA_D * t * t)
    return math.exp(-mb) * (1 + mb)


class Probe(nn.Module):
    """F(x, c_noise) = 0.3·x + c_noise, remembering what it was given."""

    def forward(self, x: Tensor, c_noise: Tensor) -> Tensor:
        self.seen = (x.detach().clone(), c_noise.detach().clone())
        return 0.3 * x + c_noise.reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("name", ["vp", "ve", "edm"])
def test_fdm_denoiser_is_the_reference_formulation(name: str) -> None:
    sigma_min, sigma_max, m, c_skip, c_out, c_noise = REFERENCE[name]
    process = make_process(name, fdm=True)
    assert (process.sigma_min, process.sigma_max, process.multiplier) == pytest.approx(
        (sigma_min, sigma_max, m)
    )
    sigmas = [sigma_min, 0.01, 0.3, 1.0, 5.0, 20.0, 50.0, 0.9 * sigma_max]
    x = torch.randn(len(sigmas), 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    probe = Probe()
    out = Denoiser(probe, process)(x.float(), torch.tensor(sigmas))
    for i, s in enumerate(sigmas):
        g = reference_gamma(s, sigma_min, sigma_max, m)
        f = 0.3 * g * x[i] + c_noise(s)
        expected = c_skip(s) * x[i] + c_out(s) * f
        torch.testing.assert_close(probe.seen[0][i].double(), g * x[i], rtol=2e-6, atol=1e-6)
        assert float(probe.seen[1][i]) == pytest.approx(c_noise(s), rel=2e-6, abs=2e-5)
        torch.testing.assert_close(out[i].double(), expected, rtol=1e-5, atol=1e-4 * max(1.0, s))


@pytest.mark.parametrize("name", ["vp", "ve"])
@pytest.mark.parametrize("step", [0, 10, 399, 400, 1000])
def test_fdm_loss_is_the_reference_loss(name: str, step: int) -> None:
    """The VP/VE-FDM loss: λ = 1/σ² capped at 5·100^{k/400} on step k until the cap passes 500, times
    |D(x0 + σn, σ) − x0|², with σ from the reference's training law (uniform t for VP)."""
    process = make_process(name, fdm=True, warmup_iters=400)
    denoiser = Denoiser(Probe(), process)
    x0 = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    loss = denoising_loss(denoiser, x0, step, torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)  # replay the same draws
    sigma = process.sample_sigma(64, generator=g)
    n = torch.randn(x0.shape, generator=g)
    cap = 5 * 100 ** (step / 400)
    total = 0.0
    for i, s in enumerate(sigma.double().tolist()):
        weight = 1 / s**2 if cap > 500 else min(1 / s**2, cap)
        d = Denoiser(Probe(), process)(x0[i : i + 1] + s * n[i : i + 1], torch.tensor([s]))
        total += weight * float(((d.double() - x0[i].double()) ** 2).mean())
    assert float(loss) == pytest.approx(total / 64, rel=1e-4)
    if name == "vp":  # t ~ U(1e-5, 1): the VP law the reference trains with
        t = torch.tensor(
            [vp_t(s) for s in process.sample_sigma(20000, torch.Generator().manual_seed(3)).tolist()]
        )
        assert float(t.min()) >= 1e-5 * 0.99 and float(t.max()) <= 1.0
        assert float(t.mean()) == pytest.approx(0.5, abs=0.01)
