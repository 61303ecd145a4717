"""SDEs and the Gaussian-mixture ground truth: closed forms against simulation and autograd."""

import math

import pytest
import torch

from lightning_diffusion.diffusion import NoiseSchedule
from lightning_diffusion.diffusion.mixture import GaussianMixture, MixtureOracle
from lightning_diffusion.diffusion.sde import VESDE, VPSDE, DiscreteVP, SubVPSDE

PROCESSES = {
    "vp": lambda: VPSDE(),
    "subvp": lambda: SubVPSDE(),
    "ve": lambda: VESDE(sigma_min=0.01, sigma_max=5.0),
    "ddpm": lambda: DiscreteVP(NoiseSchedule("linear", 1000)),
}


def simulate_forward(process, x0, t_end, steps, generator):
    """Euler-Maruyama simulation of dx = f(t) x dt + g(t) dW from 0 (or t_min) to t_end, in float64."""
    t0 = 0.0
    ts = torch.linspace(t0, t_end, steps + 1, dtype=torch.float64)
    x = x0.clone()
    for a, b in zip(ts[:-1], ts[1:]):
        tm = torch.full((x.shape[0],), float((a + b) / 2), dtype=torch.float64)
        dt = float(b - a)
        drift = process.f(tm)[:, None] * x
        x = x + drift * dt + process.g2(tm).sqrt()[:, None] * math.sqrt(dt) * torch.randn(x.shape, generator=generator, dtype=torch.float64)
    return x


@pytest.mark.parametrize("name", list(PROCESSES))
def test_marginal_prob_matches_simulated_forward_sde(name):
    process = PROCESSES[name]()
    g = torch.Generator().manual_seed(0)
    x0 = torch.tensor([[1.0, -2.0]], dtype=torch.float64).expand(20000, 2)
    t_end = 0.5 * process.t_max if name != "ddpm" else 300.0
    # VE starts from sigma_min at t=0: the simulation starts from x0 + sigma(0) noise
    start = x0 + process.sigma(torch.zeros(1))[0] * torch.randn(x0.shape, generator=g, dtype=torch.float64) if name == "ve" else x0
    x = simulate_forward(process, start, t_end, 400 if name != "ddpm" else 300, g)
    mean, std = process.marginal_prob(x0[:1], torch.tensor([t_end], dtype=torch.float64))
    assert torch.allclose(x.mean(0), mean[0], atol=4 * std.item() / math.sqrt(20000) + 2e-3)
    assert x.std(0).numpy() == pytest.approx([std.item()] * 2, rel=0.03)


@pytest.mark.parametrize("name", list(PROCESSES))
def test_ratio_inverse_and_coefficients(name):
    process = PROCESSES[name]()
    t = torch.linspace(process.t_min + 0.01 * process.t_max, process.t_max, 50, dtype=torch.float64)
    assert torch.allclose(process.t_of_ratio(process.ratio(t)), t, rtol=1e-6, atol=1e-6)
    # f = d log alpha / dt and g^2 = d sigma^2 / dt - 2 f sigma^2, by finite differences
    h = 1e-6 * process.t_max
    tt = t[5:-5] + 0.3 * (t[1] - t[0])  # off the DDPM grid points, where the slopes jump
    dlog_alpha = (process.alpha(tt + h).log() - process.alpha(tt - h).log()) / (2 * h)
    dsigma2 = (process.sigma(tt + h) ** 2 - process.sigma(tt - h) ** 2) / (2 * h)
    assert torch.allclose(process.f(tt), dlog_alpha, rtol=1e-4, atol=1e-8)
    assert torch.allclose(process.g2(tt), dsigma2 - 2 * process.f(tt) * process.sigma(tt) ** 2, rtol=1e-4, atol=1e-8)


def test_published_defaults_and_priors():
    vp, ve = VPSDE(), VESDE()
    assert (vp.beta_min, vp.beta_max, vp.T) == (0.1, 20.0, 1.0)
    assert (ve.sigma_min, ve.sigma_max, ve.T) == (0.01, 50.0, 1.0)
    assert vp.prior_std == pytest.approx(1.0, abs=1e-4) and ve.prior_std == pytest.approx(50.0)
    z = torch.zeros(3, 4)
    assert torch.allclose(ve.prior_logp(z), torch.full((3,), -2 * math.log(2 * math.pi * 2500)))
    # DDPM's linear schedule is VP with beta_min=0.1, beta_max=20 at t = (i + 1) / 1000
    ddpm = NoiseSchedule("linear", 1000).alphas_cumprod
    t = torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64)
    # (exp(-beta) vs 1 - beta per step: log abar agrees to 1%)
    assert torch.allclose(2 * vp.log_alpha(t), ddpm[(t * 1000).long() - 1].log(), rtol=1e-2)


def test_mixture_score_density_and_denoiser_are_consistent():
    mix = GaussianMixture.random(5, 16, seed=1)
    x = torch.randn(64, 16, dtype=torch.float64, requires_grad=True)
    alpha, sigma = torch.full((64,), 0.8, dtype=torch.float64), torch.full((64,), 0.6, dtype=torch.float64)
    logp = mix.log_prob(x, alpha, sigma)
    (grad,) = torch.autograd.grad(logp.sum(), x)
    assert torch.allclose(mix.score(x.detach(), alpha, sigma), grad, rtol=1e-9, atol=1e-9)
    # the noised density integrates to one (2-D grid check)
    mix2 = GaussianMixture.circle()
    grid = torch.linspace(-4, 4, 401, dtype=torch.float64)
    xy = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
    mass = mix2.log_prob(xy, 0.9, 0.3).exp().sum() * (grid[1] - grid[0]) ** 2
    assert mass.item() == pytest.approx(1.0, abs=1e-3)
    # Tweedie's denoiser equals E[x0 | x_t] by Monte Carlo at one point
    g = torch.Generator().manual_seed(0)
    x0, _ = mix2.sample(400_000, g)
    xt = 0.9 * x0 + 0.3 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    near = (xt - torch.tensor([1.2, 1.2], dtype=torch.float64)).norm(dim=1) < 0.05
    assert torch.allclose(x0[near].mean(0), mix2.denoise(torch.tensor([[1.2, 1.2]], dtype=torch.float64), 0.9, 0.3)[0], atol=0.03)


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v", "score"])
def test_oracle_parameterizations_agree(parameterization):
    mix, vp = GaussianMixture.circle(), VPSDE()
    oracle = MixtureOracle(mix, vp, parameterization)
    x, t = torch.randn(32, 2), torch.rand(32) * 0.9 + 0.05
    out = oracle(x, t).double()
    a, s = vp.alpha(t)[:, None], vp.sigma(t)[:, None]
    score = mix.score(x, a[:, 0], s[:, 0])
    expected = {"score": score, "eps": -s * score, "x0": (x + s**2 * score) / a,
                "v": a * (-s * score) - s * (x + s**2 * score) / a}[parameterization]
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)
