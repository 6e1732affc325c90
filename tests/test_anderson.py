"""The accelerated Picard solver (ParaTAA's triangular Anderson acceleration): the same fixed point, error
test and window as ParaDiGMS, checked against the sequential sampler and against plain Picard's cost."""

import pytest
import torch

from benchmarks.common import DIGITS_UNET
from fdm_core.analytic import GaussianDenoiser
from fdm_core.networks import UNet
from fdm_core.picard import TriangularAnderson, parallel_sample
from fdm_core.precond import Denoiser
from fdm_core.processes import make_process
from fdm_core.samplers import get_sigmas, process_grid, sample

MU, S = 0.3, 0.5
STEPS = {"euler": 64, "heun": 32, "ddpm": 200}


def _gaussian(method: str) -> tuple[GaussianDenoiser, torch.Tensor, torch.Tensor]:
    sigmas = get_sigmas("karras", STEPS[method], 0.002, 80.0)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80.0
    return GaussianDenoiser(MU, S), x, sigmas


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(1)


@pytest.mark.parametrize("method", ["euler", "heun", "ddpm"])
def test_window_one_is_the_sequential_sampler(method: str) -> None:
    den, x, sigmas = _gaussian(method)
    ref = sample(den, x, sigmas, method, _gen())
    out, stats = parallel_sample(den, x, sigmas, method, window=1, generator=_gen(), solver="anderson")
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert stats.parallel_iterations == len(sigmas) - 1 and stats.solver == "anderson"


@pytest.mark.parametrize("method", ["euler", "heun", "ddpm"])
@pytest.mark.parametrize("tol", [0.1, 1e-4])
def test_gaussian_converges_to_the_sequential_result(method: str, tol: float) -> None:
    den, x, sigmas = _gaussian(method)
    ref = sample(den, x, sigmas, method, _gen())
    out, stats = parallel_sample(den, x, sigmas, method, 16, tol, _gen(), solver="anderson", history=2)
    # The same error test as Picard's: every accepted state moved by < tol x its step's noise.
    assert float((out - ref).abs().max()) < tol * S
    assert stats.parallel_iterations <= len(sigmas) - 1


def test_the_fixed_point_is_unchanged() -> None:
    """At the fixed point (zero residual) the mixing vanishes, whatever the history holds."""
    aa = TriangularAnderson(history=2)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    w = torch.ones(5, dtype=torch.float64)
    aa.update(0, x + 1, torch.randn_like(x), w)
    aa.update(0, x + 0.5, torch.randn_like(x), w)
    torch.testing.assert_close(aa.update(0, x, torch.zeros_like(x), w), x, rtol=0, atol=0)


def test_rejects_an_unknown_solver_and_no_history() -> None:
    den, x, sigmas = _gaussian("euler")
    with pytest.raises(ValueError, match="solver"):
        parallel_sample(den, x, sigmas, "euler", solver="newton")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="history"):
        parallel_sample(den, x, sigmas, "euler", solver="anderson", history=0)


def _digits_unet() -> Denoiser:
    """The shipped digits U-Net (VP-FDM), seeded random weights; its zero-initialised output layer is drawn
    too, so the denoiser is a non-linear function of x and σ rather than c_skip·x."""
    torch.manual_seed(0)
    net = UNet(**DIGITS_UNET)
    torch.nn.init.normal_(net.out[-1].weight, std=0.1)
    return Denoiser(net, make_process("vp", fdm=True)).eval()


@pytest.mark.parametrize(
    ("method", "steps", "window", "tol"), [("ddpm", 200, 32, 0.1), ("euler", 50, 50, 0.01)]
)
def test_never_more_iterations_than_picard_on_the_digits_unet(
    method: str, steps: int, window: int, tol: float
) -> None:
    """Fair as a fast check: the iteration count is set by how the sampler map propagates a change along the
    trajectory, which the architecture, its preconditioning and the grid decide (the same as a trained
    model's); a trained model is checked in benchmarks/picard.py (DDPM-1000, Euler-100)."""
    den = _digits_unet()
    sigmas = process_grid(den.process, steps)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    ref = sample(den, x, sigmas, method, _gen())
    _, plain = parallel_sample(den, x, sigmas, method, window, tol, _gen())
    out, fast = parallel_sample(den, x, sigmas, method, window, tol, _gen(), solver="anderson")
    assert fast.parallel_iterations <= plain.parallel_iterations
    assert float((out - ref).abs().max()) < tol * float(
        ref.abs().max()
    )  # untrained: samples far from [-1, 1]
