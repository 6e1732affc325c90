"""A short training run learns a 2-D mixture, for VP, VE and EDM, baseline and FDM."""

import math

import pytest
import torch

from fdm_core.metrics import sliced_wasserstein
from fdm_core.networks import MLP
from fdm_core.precond import Denoiser
from fdm_core.processes import make_process
from fdm_core.samplers import process_grid, sample
from fdm_core.training import EMA, TrainState, denoising_loss, train_step


def _mixture(n: int, g: torch.Generator) -> torch.Tensor:
    """Four tight Gaussians on the corners of a square: far from any single Gaussian."""
    centers = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]])
    idx = torch.randint(0, 4, (n,), generator=g)
    return centers[idx] + 0.1 * torch.randn(n, 2, generator=g)


@pytest.mark.parametrize("name", ["vp", "ve", "edm"])
@pytest.mark.parametrize("use_fdm", [False, True])
def test_mlp_learns_mixture(name: str, use_fdm: bool) -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    process = make_process(name, fdm=use_fdm, warmup_iters=100)
    model = Denoiser(MLP(2, hidden=96, depth=3), process)
    ema = EMA(model, decay=0.99)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    state = TrainState()
    for _ in range(600):
        x0 = _mixture(256, g)
        train_step(model, opt, lambda x0=x0: denoising_loss(model, x0, state.warmup_step, g), state, ema)
    assert state.step == state.warmup_step == 600

    data = _mixture(2000, torch.Generator().manual_seed(1))
    sigmas = process_grid(process, 32)
    x = torch.randn(2000, 2, generator=torch.Generator().manual_seed(2)) * float(sigmas[0])
    samples = sample(ema.model, x, sigmas, "heun")
    gauss_fit = data.mean(0) + data.std(0) * torch.randn(2000, 2, generator=torch.Generator().manual_seed(3))
    sw_model = sliced_wasserstein(samples, data)
    sw_noise = sliced_wasserstein(x, data)
    sw_gauss = sliced_wasserstein(gauss_fit, data)
    assert math.isfinite(sw_model)
    assert sw_model < 0.05 * sw_noise
    # It learned the four modes, not just the first two moments.
    assert sw_model < 0.5 * sw_gauss, (sw_model, sw_gauss)


def test_non_finite_loss_names_the_step() -> None:
    model = Denoiser(MLP(2), make_process("edm"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = TrainState(step=41)
    with pytest.raises(FloatingPointError, match="step 41"):
        train_step(model, opt, lambda: torch.tensor(float("nan"), requires_grad=True), state)
    assert state.step == 41


def test_ema_tracks_weights() -> None:
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.add_(1.0)
    before = ema.model.weight.clone()
    ema.update(model)
    assert torch.allclose(ema.model.weight, (before + model.weight) / 2)


def test_ema_rampup_caps_the_mean_weight_age_at_a_fraction_of_the_steps_taken() -> None:
    """EDM's ema_rampup_ratio: with rampup r the EMA after k steps averages about the last r*k weights."""
    model = torch.nn.Linear(1, 1, bias=False)
    ema = EMA(model, decay=0.999, rampup=0.1)
    assert ema.decay_at(10) == 0.0  # mean age capped at 1 step: the EMA is the weights
    assert ema.decay_at(1000) == pytest.approx(1 - 1 / 100)
    assert ema.decay_at(100_000) == 0.999  # the cap no longer binds
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    state = TrainState()
    for _ in range(50):  # the weight walks 0, 1, 2, ...: the loss's gradient is -1
        train_step(model, opt, lambda: -model.weight.sum(), state, ema, grad_clip=None)
    lag = model.weight.item() - ema.model.weight.item()
    assert lag == pytest.approx(1 / (1 - ema.decay_at(50)) - 1, rel=0.2)  # a constant 0.999 lags ~25
    with pytest.raises(ValueError, match="ema_rampup"):
        EMA(model, rampup=0.0)
