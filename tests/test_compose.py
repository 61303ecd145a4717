"""Composition of Gaussian-diffusion models by adding energies (issue 23, item 3) against ground truth.

Two known 2-D Gaussian mixtures are the terms: at every noise level each term's energy is the exact
energy of its diffused mixture (``MixtureOracle``), and their normalised product is a Gaussian mixture
in closed form (``GaussianMixture.product``, checked here against quadrature). The sum of the diffused
energies is the product's energy only at t -> 0 (Du et al. 2023, sec. 3): the corrected sampler
(``annealed_mcmc``, MALA and HMC) must match the product's mode weights, mean and covariance within
Monte Carlo error, where the plain score sum (ancestral, Euler-Maruyama) misses them by many standard
errors.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_diffusion import DDPM, MLP, EnergyHead, ScoreSDE, Term, compose, conditional_product
from lightning_diffusion.diffusion import samplers
from lightning_diffusion.diffusion.mixture import GaussianMixture, MixtureOracle
from lightning_diffusion.diffusion.schedules import NoiseSchedule
from lightning_diffusion.diffusion.sde import VPSDE, DiscreteVP
from lightning_diffusion.errors import OptionError
from lightning_diffusion.models.compose import combine_denoised

pytestmark = pytest.mark.usefixtures("one_thread")

N = 6000
SDE = VPSDE()
#: two mixtures whose product puts (0.4, 0.1, 0.4, 0.1) on four modes at (+-0.5, +-0.5), between the
#: modes of each: the diffused marginals' product differs most from the diffused product there
A = GaussianMixture(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]), torch.tensor([0.4, 0.4]))
B = GaussianMixture(torch.tensor([[0.0, -1.0], [0.0, 1.0]]), torch.tensor([0.4, 0.4]), torch.tensor([0.8, 0.2]))


def oracle(mix: GaussianMixture, process=SDE, parameterization: str = "energy") -> ScoreSDE:
    """A ScoreSDE whose net is the mixture's exact energy (or eps) at every noise level."""
    return ScoreSDE(MixtureOracle(mix, process, parameterization), sde=process, parameterization=parameterization,
                    data_shape=(2,))


def z_errors(x: torch.Tensor, target: GaussianMixture) -> dict[str, float]:
    """The largest error, in standard errors of the sample's own statistics, of the mode weights (mean
    posterior responsibility under ``target``: unbiased for exact draws), the mean and the covariance."""
    x = x.double()
    log_comp = target._noised(x, 1.0, 0.0)[0]
    resp = torch.softmax(log_comp, 1)
    weight_z = (resp.mean(0) - target.weights).abs() / (resp.std(0) / math.sqrt(len(x))).clamp_min(1e-12)
    mean = (target.weights[:, None] * target.means).sum(0)
    d = target.means - mean
    cov = (target.weights[:, None, None] * (d[:, :, None] * d[:, None, :]
                                            + target.stds[:, None, None] ** 2 * torch.eye(2, dtype=torch.float64))).sum(0)
    mean_z = (x.mean(0) - mean).abs() / (x.std(0) / math.sqrt(len(x)))
    centred = x - x.mean(0)
    products = centred[:, :, None] * centred[:, None, :]  # [N, 2, 2]
    cov_z = (products.mean(0) - cov).abs() / (products.std(0) / math.sqrt(len(x)))
    return {"weights": float(weight_z.max()), "mean": float(mean_z.max()), "cov": float(cov_z.max())}


def draw(sampler: str, seed: int = 0, **options) -> torch.Tensor:
    composition = compose([Term(oracle(A)), Term(oracle(B))])
    return composition.sample(N, sampler=sampler, generator=torch.Generator().manual_seed(seed), **options)


# -- the analytic product --------------------------------------------------------------------------
def test_product_of_two_mixtures_is_the_normalised_product_of_densities():
    """On a 401 x 401 grid over [-5, 5]^2: ``log Z`` is the quadrature of p q, and the product's density
    is p q / Z pointwise."""
    grid = torch.linspace(-5, 5, 401, dtype=torch.float64)
    xy = torch.cartesian_prod(grid, grid)
    cell = float(grid[1] - grid[0]) ** 2
    log_pq = A.log_prob(xy) + B.log_prob(xy)
    quadrature = torch.logsumexp(log_pq, 0) + math.log(cell)
    assert abs(float(A.log_normaliser_of_product(B)) - float(quadrature)) < 1e-6
    product = A.product(B)
    assert product.means.shape == (4, 2) and torch.allclose(product.weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert torch.allclose(product.log_prob(xy), log_pq - quadrature, atol=1e-6)
    assert torch.allclose(product.weights, torch.tensor([0.4, 0.1, 0.4, 0.1], dtype=torch.float64), atol=1e-12)


# -- the composed energy and denoiser ---------------------------------------------------------------
def test_composed_energy_and_denoiser_are_the_weighted_sums():
    """At every noise level: energy = sum w_i E_i exactly; the denoiser's score (alpha x0 - x) / sigma^2
    is sum w_i score_i (weights 1.5 and -0.5: the x_t term of combine_denoised is needed); the terms
    of one model go through it in one call."""
    eps_a = oracle(A, parameterization="eps")
    composition = compose([Term(oracle(A), None, 1.5), Term(oracle(B), None, -0.5)])
    mixed = compose([Term(eps_a, None, 1.5), Term(oracle(B), None, -0.5)])  # denoisers of any parameterization
    x = 2 * torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    for t in (1e-3, 0.1, 0.5, 1.0):
        tb = torch.full((64,), t)
        alpha, sigma = SDE.alpha(tb), SDE.sigma(tb)
        with torch.no_grad():
            energy = composition.energy(x, tb)
            x0, x0_mixed = composition.denoise(x, tb), mixed.denoise(x, tb)
        exact = 1.5 * A.energy(x, alpha, sigma) - 0.5 * B.energy(x, alpha, sigma)
        assert torch.allclose(energy.double(), exact, rtol=1e-5, atol=1e-4)
        score = 1.5 * A.score(x, alpha, sigma) - 0.5 * B.score(x, alpha, sigma)
        for denoised in (x0, x0_mixed):
            got = (alpha[:, None] * denoised.double() - x) / sigma[:, None] ** 2
            assert torch.allclose(got, score, rtol=1e-3, atol=1e-3 * (score.abs().max().item() + 1)), t
    calls = []
    model = oracle(A)
    model.net.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    y = torch.zeros(64, dtype=torch.long)
    compose([Term(model, y, 1.0), Term(model, y, 1.0)]).energy(x, torch.full((64,), 0.5))
    assert calls == [128]


def test_combine_denoised_is_guidance_when_the_weights_sum_to_one():
    x0_y, x0_null, x_t = torch.randn(3, 5, 2, generator=torch.Generator().manual_seed(0))
    alpha = torch.tensor(0.7)
    assert torch.allclose(combine_denoised([x0_y, x0_null], [3.0, -2.0], x_t, alpha), x0_null + 3.0 * (x0_y - x0_null))


# -- sampling the product: corrected against plain score sum -----------------------------------------
#: the corrected sampler's settings: 50 levels, large Metropolis-tested moves (the step is tied to
#: sigma_t, so at the last levels small moves cannot widen the modes that the summed scores of the
#: middle levels made too narrow: at step_scale 0.5 the covariance stays 6 standard errors short)
CORRECTED = {"mala": {"mcmc_steps": 4, "step_scale": 4.0},
             "hmc": {"mcmc_steps": 3, "step_scale": 2.0, "leapfrog_steps": 3}}


@pytest.mark.parametrize("kernel", ["mala", "hmc"])
def test_annealed_mcmc_samples_the_analytic_product(kernel):
    """The corrected sampler's 6000 samples (50 levels) match the product's mode weights, mean and
    covariance within 4 standard errors (measured: at most 1.5 and 2.8 over two seeds); the acceptance
    is reported per level (these large steps are mostly rejected at the high-noise levels: MALA ~0.01 there)."""
    options = CORRECTED[kernel]
    composition = compose([Term(oracle(A)), Term(oracle(B))])
    x = composition.sample(N, sampler="annealed_mcmc", steps=50, kernel=kernel, variance="fixedlarge",
                           generator=torch.Generator().manual_seed(0), **options)
    errors = z_errors(x, A.product(B))
    assert max(errors.values()) < 4, errors
    per_move = options.get("leapfrog_steps", 1)
    assert composition.last_sample_nfe == 2 * (50 + 49 * options["mcmc_steps"] * per_move)
    acceptance = composition.last_sample_acceptance
    assert len(acceptance) == 49 and all(0.0 <= a <= 1.0 for a in acceptance) and min(acceptance) < 0.9


@pytest.mark.parametrize("sampler", ["ancestral", "euler_maruyama"])
def test_the_plain_score_sum_misses_the_product(sampler):
    """Known failure (Du et al. 2023, sec. 3): summing the diffused scores samples a distorted product.
    With 200 steps (1000 give the same) the mode weights and the covariance (modes too narrow) are off
    by many standard errors, each at least 3x the corrected sampler's error."""
    plain = z_errors(draw(sampler, steps=200), A.product(B))
    corrected = z_errors(draw("annealed_mcmc", steps=50, variance="fixedlarge", **CORRECTED["mala"]), A.product(B))
    assert plain["weights"] > 8 and plain["cov"] > 15, plain  # measured: 13 and 28 (ancestral), 11 and 21 (EM)
    assert all(plain[k] > 3 * corrected[k] for k in plain), (plain, corrected)


# -- refusals ---------------------------------------------------------------------------------------
def test_mixed_processes_are_refused_naming_the_terms():
    ddpm = DDPM(MixtureOracle(A, DiscreteVP(NoiseSchedule("linear", 100)), "energy"), timesteps=100,
                parameterization="energy", data_shape=(2,))
    with pytest.raises(ValueError, match=r"term 1 \(DDPM on DiscreteVP, t in \[0, 99\]\) and term 0 \(ScoreSDE on "
                                         r"VPSDE, t in \[1e-05, 1\]\) do not share their Gaussian process"):
        compose([Term(oracle(A)), Term(ddpm)])
    other_vp = oracle(B, VPSDE(beta_max=10.0))
    with pytest.raises(ValueError, match="term 1 .* do not share"):
        compose([Term(oracle(A)), Term(other_vp)])
    compose([Term(oracle(A)), Term(oracle(B, VPSDE()))])  # an equal process, another instance: fine


def test_a_term_without_energy_is_refused_for_the_mcmc_sampler_naming_its_parameterization():
    composition = compose([Term(oracle(A)), Term(oracle(B, parameterization="eps"))])
    with pytest.raises(OptionError, match=r"sampler='annealed_mcmc': .*term 1's ScoreSDE \(parameterization 'eps'\) "
                                          r"has none; compose models trained with parameterization: energy"):
        composition.sample(8, sampler="annealed_mcmc", steps=5)
    with pytest.raises(ValueError, match="term 1's ScoreSDE has parameterization 'eps', which has no energy"):
        composition.energy(torch.zeros(4, 2), torch.full((4,), 0.5))
    assert composition.sample(8, sampler="ddim", steps=5).shape == (8, 2)  # the denoiser samplers need none
    with pytest.raises(OptionError, match="no option 'kernal'"):
        composition.sample(8, sampler="ddim", steps=5, kernal="hmc")
    with pytest.raises(OptionError, match="precision='bf16': Composition.sample has no such option"):
        composition.sample(8, sampler="ddim", steps=5, precision="bf16")


# -- guidance of an energy model is a composition --------------------------------------------------
def _tiny_energy_ddpm(seed: int = 0) -> DDPM:
    torch.manual_seed(seed)
    net = EnergyHead(MLP(in_channels=2, hidden=16, num_layers=1, num_classes=4))
    return DDPM(net, timesteps=20, parameterization="energy", data_shape=(2,), num_classes=4, class_conditional=True)


def test_guided_annealed_mcmc_is_the_composition_with_weights_w_and_1_minus_w():
    """``sample(sampler="annealed_mcmc", guidance_scale=w)`` on an energy model runs on
    ``E_null + w (E_y - E_null)``: the energy of compose([(model, y, w), (model, null, 1 - w)]); the same
    seed gives the same samples."""
    model, n, w = _tiny_energy_ddpm(), 16, 3.0
    y, null = torch.full((n,), 2), torch.full((n,), -1)
    composition = compose([Term(model, y, w), Term(model, null, 1 - w)])
    x, t = torch.randn(n, 2), torch.full((n,), 7)
    guided = model.sampling_energy(y, w)
    assert torch.allclose(guided(x, t), composition.energy(x, t), atol=1e-5)
    assert not torch.allclose(guided(x, t), model.sampling_energy(y)(x, t), atol=1e-3)  # guidance changes it
    options = {"sampler": "annealed_mcmc", "steps": 6, "mcmc_steps": 2}
    ours = model.sample(n, y=y, guidance_scale=w, generator=torch.Generator().manual_seed(0), **options)
    theirs = composition.sample(n, generator=torch.Generator().manual_seed(0), **options)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert model.last_sample_acceptance == pytest.approx(composition.last_sample_acceptance, abs=1e-6)
    with pytest.raises(ValueError, match="guidance_scale=3.0 needs a class_conditional model and labels y"):
        model.sampling_energy(None, w)  # not silently unguided


# -- conditional_product on a tiny energy DDPM -------------------------------------------------------
def test_conditional_product_runs_with_every_sampler():
    """E(x|a) + E(x|b) - E(x) of an untrained class-conditional energy DDPM: three terms of one model
    (one net call on the 3B batch), every sampler of the registry returns [n, 2] finite samples and
    counts each term's evaluation in last_sample_nfe."""
    model, n = _tiny_energy_ddpm(), 6
    product = conditional_product(model, [torch.full((n,), 0), torch.full((n,), 3)])
    assert [(int(term.y[0]), term.weight) for term in product.terms] == [(0, 1.0), (3, 1.0), (-1, -1.0)]
    for name in samplers.SAMPLERS:
        steps = None if name == "ode" else 4
        x = product.sample(n, sampler=name, steps=steps, generator=torch.Generator().manual_seed(0))
        assert x.shape == (n, 2) and torch.isfinite(x).all(), name
        assert product.last_sample_nfe and product.last_sample_nfe % 3 == 0, name
        single = model.sample(n, y=torch.full((n,), 0), sampler=name, steps=steps,
                              generator=torch.Generator().manual_seed(0))
        if name != "ode":  # fixed grids: three terms, three times the network evaluations
            assert product.last_sample_nfe == 3 * model.last_sample_nfe, name
        assert single.shape == x.shape
    assert list(samplers.SAMPLERS)[-1] == "annealed_mcmc" and len(product.last_sample_acceptance) == 3  # 4 levels
    assert model.training  # back in training mode after sampling
    weighted = conditional_product(model, [torch.full((n,), 0), torch.full((n,), 3)], weights=[2.0, 0.5])
    assert [term.weight for term in weighted.terms] == [2.0, 0.5, -1.5]
    with pytest.raises(ValueError, match="term 0's labels y have 6 rows for num_samples=5"):
        product.sample(5, sampler="ddim", steps=4)
