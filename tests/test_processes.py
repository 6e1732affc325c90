"""Processes, preconditioning and the two FDM changes (docs/design.md: The math)."""

import math

import pytest
import torch

from fdm_core import fdm
from fdm_core.networks import MLP, UNet
from fdm_core.precond import Denoiser
from fdm_core.processes import make_process, vp_sigma, vp_sigma_inv
from fdm_core.targets import eps_target, v_target, weighting, x0_from


@pytest.mark.parametrize(
    ("sigma", "expected", "rel"), [(10, 0.955, 2e-3), (20, 0.63, 5e-3), (40, 0.038, 0.01), (80, 3.9e-8, 0.02)]
)
def test_fdm_gamma_check_values_edm(sigma: float, expected: float, rel: float) -> None:
    p = make_process("edm", fdm=True, multiplier=2.0)
    assert float(p.c_in(torch.tensor([float(sigma)]))) == pytest.approx(expected, rel=rel)


def test_fdm_sigma_ranges_and_ve_multiplier() -> None:
    vp = make_process("vp", fdm=True)
    assert vp.sigma_min == pytest.approx(0.0010005, rel=1e-4)
    assert vp.sigma_max == pytest.approx(152.17, rel=1e-4)
    assert make_process("ve", fdm=True).multiplier == 1.0
    with pytest.raises(ValueError, match="multiplier"):
        make_process("ve", fdm=True, multiplier=2.0)
    # gamma(sigma_min) = 1: at the bottom of the range FDM leaves the input unscaled.
    assert float(vp.c_in(torch.tensor([vp.sigma_min]))) == pytest.approx(1.0)


def test_warmup_cap_follows_schedule_then_releases() -> None:
    w = 400
    for k in (0, 1, 57, 200, 399, 400):
        assert fdm.warmup_cap(k, w) == pytest.approx(5 * 100 ** (k / w))
    assert fdm.warmup_cap(401, w) is None
    p = make_process("vp", fdm=True, warmup_iters=w)
    sigma = torch.tensor([1e-3, 0.01, 1.0])
    capped = p.training_weight(sigma, warmup_step=0)
    assert torch.allclose(capped, torch.tensor([5.0, 5.0, 1.0]))
    assert torch.allclose(p.training_weight(sigma, warmup_step=500), 1 / sigma**2)
    assert torch.allclose(make_process("vp").training_weight(sigma, 0), 1 / sigma**2)


def test_vp_sigma_inverse_and_cnoise() -> None:
    t = torch.tensor([1e-5, 0.3, 1.0], dtype=torch.float64)
    assert torch.allclose(vp_sigma_inv(vp_sigma(t)), t)
    p = make_process("vp")
    assert torch.allclose(p.c_noise(vp_sigma(t)), 999 * t)


@pytest.mark.parametrize("name", ["vp", "ve", "edm"])
def test_training_sigmas_in_range_and_weights(name: str) -> None:
    p = make_process(name)
    s = p.sample_sigma(20000, torch.Generator().manual_seed(0))
    if name != "edm":
        assert float(s.min()) >= p.sigma_min * 0.999 and float(s.max()) <= p.sigma_max * 1.001
    else:
        assert float(torch.log(s).mean()) == pytest.approx(-1.2, abs=0.05)
        assert float(torch.log(s).std()) == pytest.approx(1.2, abs=0.05)
        sig = torch.tensor([0.5])
        assert float(p.loss_weight(sig)) == pytest.approx((0.25 + 0.25) / (0.25 * 0.25))


@pytest.mark.parametrize("name", ["vp", "ve", "edm"])
@pytest.mark.parametrize("use_fdm", [False, True])
def test_fresh_denoiser_starts_at_c_skip_x(name: str, use_fdm: bool) -> None:
    p = make_process(name, fdm=use_fdm)
    d = Denoiser(MLP(2), p)
    x, sigma = torch.randn(5, 2), torch.full((5,), 1.5)
    assert torch.allclose(d(x, sigma), p.c_skip(sigma)[:, None] * x)


def test_parameterisations_round_trip_and_weights() -> None:
    x0, n = torch.randn(6, 3), torch.randn(6, 3)
    sigma = torch.tensor([0.1, 0.5, 1.0, 2.0, 10.0, 50.0])
    x = x0 + sigma[:, None] * n
    assert torch.allclose(eps_target(x, x0, sigma), n, atol=1e-5)
    for param, target in (("x", x0), ("eps", eps_target(x, x0, sigma)), ("v", v_target(x, x0, sigma))):
        assert torch.allclose(x0_from(param, target, x, sigma), x0, atol=1e-4)
    # |v_hat - v|^2 = (SNR + 1) |x_hat - x0|^2 : the v-loss is the SNR+1 weighting in x-space.
    x_hat = x0 + 0.1 * torch.randn(6, 3)
    v_hat = v_target(x, x_hat, sigma)
    lhs = ((v_hat - v_target(x, x0, sigma)) ** 2).sum(1)
    rhs = weighting("snr_plus_one", sigma) * ((x_hat - x0) ** 2).sum(1)
    assert torch.allclose(lhs, rhs, rtol=1e-4)
    assert torch.allclose(weighting("truncated_snr", sigma), torch.clamp(1 / sigma**2, min=1))


@pytest.mark.parametrize("res", [8, 16, 32, 64])
def test_unet_shapes_from_8_to_64(res: int) -> None:
    mult = {8: (1, 2), 16: (1, 2, 2), 32: (1, 2, 2), 64: (1, 1, 2, 2)}[res]
    net = UNet(
        img_resolution=res,
        in_channels=3,
        model_channels=16,
        channel_mult=mult,
        num_blocks=1,
        attn_resolutions=(res // 4,),
        dropout=0.1,
    )
    out = net(torch.randn(2, 3, res, res), torch.randn(2))
    assert out.shape == (2, 3, res, res)


def test_unet_refuses_unhalvable_resolution() -> None:
    with pytest.raises(ValueError, match="img_resolution"):
        UNet(img_resolution=12, channel_mult=(1, 2, 2, 2))


def test_denoiser_fp32_at_extreme_sigma() -> None:
    d = Denoiser(MLP(2), make_process("edm", fdm=True))
    out = d(torch.randn(3, 2, dtype=torch.float16).float() * 80, torch.full((3,), 80.0))
    assert torch.isfinite(out).all()
    assert math.isfinite(float(make_process("edm", fdm=True).c_in(torch.tensor([80.0]))))
