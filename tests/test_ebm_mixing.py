"""EBM sampling that mixes, against exact ground truth: an EBM whose energy is the exact energy of an
unequal-weight Gaussian mixture with separated modes of different widths (log Z = 0). The default
``sample()`` (SMC along AIS's path) recovers every mode's weight and an energy distance to a true
sample within 3x of independent exact samples' (at several seeds); a MALA chain from the base keeps
the base's mode weights and does not; SMC's log Z is 0 within its reported standard error (2-D and
16-D)."""

import pytest
import torch

from test_ebm import MixtureEnergy  # E = -log p_mix + c: log Z = -c exactly
from lightning_diffusion import mcmc
from lightning_diffusion.diffusion.mixture import GaussianMixture
from lightning_diffusion.metrics.quality import energy_distance
from lightning_diffusion.models.ebm import EBM

pytestmark = pytest.mark.usefixtures("one_thread")

WEIGHTS = (0.55, 0.3, 0.15)


def _mixture(dim: int) -> GaussianMixture:
    """Three modes 6 apart (a narrow heavy one, a wide one, a light one), weights :data:`WEIGHTS`."""
    means = torch.zeros(3, dim, dtype=torch.float64)
    means[0, 0], means[1, 0], means[2, 1] = -3.0, 3.0, 4.0
    return GaussianMixture(means, torch.tensor([0.2, 0.8, 0.4], dtype=torch.float64),
                           torch.tensor(WEIGHTS, dtype=torch.float64))


def _model(mixture: GaussianMixture, dim: int) -> tuple[EBM, torch.Tensor]:
    data = mixture.sample(4000, torch.Generator().manual_seed(1))[0].float()
    model = EBM(MixtureEnergy(mixture, 0.0), data_shape=(dim,))
    model.fit_base(data)  # the base: the Gaussian fitted to the mixture (full covariance)
    return model, data


def _mode_weights(mixture: GaussianMixture, x: torch.Tensor) -> torch.Tensor:
    labels = torch.cdist(x.double(), mixture.means).argmin(1)
    return torch.bincount(labels, minlength=3).double() / x.shape[0]


def _floor(mixture: GaussianMixture, reference: torch.Tensor) -> float:
    """The noise floor: the mean energy distance to ``reference`` of 8 independent exact samples of its
    size. One exact draw's distance is itself noisy (in 2-D its ratio to this mean has sd ~0.9 and
    exceeds 2 in 12% of 60 draws, 3 in 1 of 60; 16-D: 2 in 5%, max 2.4)."""
    n = reference.shape[0]
    return sum(energy_distance(mixture.sample(n, torch.Generator().manual_seed(1000 + k))[0].float(), reference)
               for k in range(8)) / 8


SMC_CASES = [(2, 200, seed) for seed in (1, 2, 3, 4)] + [(16, 500, seed) for seed in (1, 2)]
SMC_SLOW_CASES = [(2, 200, seed) for seed in range(5, 13)] + [(16, 500, seed) for seed in range(3, 9)]


def _check_default_sample(dim: int, steps: int, seed: int) -> None:
    mixture = _mixture(dim)
    model, data = _model(mixture, dim)
    n = 2000
    truth = torch.tensor(WEIGHTS, dtype=torch.float64)
    reference = data[:n]
    x = model.sample(n, steps=steps, generator=torch.Generator().manual_seed(seed))
    weights = _mode_weights(mixture, x)
    assert torch.all((weights - truth).abs() < 0.045), weights
    ratio = energy_distance(x, reference) / _floor(mixture, reference)
    assert ratio < 3, ratio
    diagnostics = model.last_sample_diagnostics
    assert diagnostics["sampler"] == "smc" and diagnostics["resampled"].sum() > 0 and diagnostics["particles"] == 4 * n
    assert abs(diagnostics["log_z"]) < 4 * diagnostics["stderr"] + 0.05, diagnostics["log_z"]


@pytest.mark.parametrize("dim,steps,seed", SMC_CASES)
def test_default_sample_draws_the_mode_weights(dim, steps, seed):
    """The default sample() (SMC, 4 particles per sample), n = 2000 samples, at seeds that the
    1-particle-per-sample default failed (2-D seeds 2 and 4 at 6x and 12x the floor, 16-D seed 2 at
    7x). The mode weights within 0.045 of (0.55, 0.3, 0.15): 4 binomial standard errors of n
    independent draws; the energy distance to a true sample under 3x the noise floor (the mean of 8
    independent exact samples' distances, :func:`_floor`: an exact sampler passes 3x in ~98% of
    draws, 2x in only ~88%, so 2x cannot be asked of every seed). Measured (ratio to the floor, seeds
    1-12 in 2-D, 1-8 in 16-D): 1 particle per sample: 2-D 0.2-12.1 (4 of 12 over 3), 16-D 0.9-7.2
    (3 of 8 over 3); 4 per sample: 2-D 0.3-2.3, 16-D 0.8-2.7; see the README. SMC's log Z (reported
    with the samples) is 0 within 4 of its standard errors + 0.05."""
    _check_default_sample(dim, steps, seed)


@pytest.mark.slow
@pytest.mark.parametrize("dim,steps,seed", SMC_SLOW_CASES)
def test_default_sample_draws_the_mode_weights_more_seeds(dim, steps, seed):
    """:func:`test_default_sample_draws_the_mode_weights` at 8 more seeds in 2-D and 6 in 16-D."""
    _check_default_sample(dim, steps, seed)


@pytest.mark.parametrize("dim", [2, 16])
def test_a_mala_chain_keeps_the_base_mode_weights(dim):
    """1000 MALA steps (step 0.1) from the base, 2000 chains: the heaviest mode's weight off by over
    0.15 and the energy distance > 5x the noise floor (each chain stays in the mode it started in)."""
    mixture = _mixture(dim)
    model, data = _model(mixture, dim)
    n = 2000
    truth = torch.tensor(WEIGHTS, dtype=torch.float64)
    reference = data[:n]
    chain = model.sample(n, sampler="mala", step_size=0.1, steps=1000, generator=torch.Generator().manual_seed(2))
    chain_weights = _mode_weights(mixture, chain)
    assert (chain_weights[0] - truth[0]).abs() > 0.15, chain_weights
    assert energy_distance(chain, reference) > 5 * _floor(mixture, reference)


def test_smc_log_z_and_its_standard_error():
    """mcmc.smc on the 2-D mixture, 10 seeds of 16 islands x 128 particles: log Z = 0 within 4
    reported standard errors in every run, and the reported stderr within a factor 2 of the spread of
    the estimates over the seeds (an honest error, not a decoration)."""
    mixture = _mixture(2)
    model, _ = _model(mixture, 2)
    estimates, errors = [], []
    for seed in range(10):
        out = mcmc.smc(model.energy, model.base(), 2048, step_size=0.1, betas=100, islands=16,
                       generator=torch.Generator().manual_seed(seed))
        estimates.append(out.log_z)
        errors.append(out.stderr)
        assert abs(out.log_z) < 4 * out.stderr, (out.log_z, out.stderr)
        assert out.ess.shape == (100,) and out.x.shape == (2048, 2)
    spread = torch.tensor(estimates).std().item()
    mean_error = sum(errors) / len(errors)
    assert 0.5 < mean_error / spread < 2.0, (mean_error, spread)


def test_systematic_resampling_is_unbiased():
    """Each index's expected count is n times its weight: the mean counts over 2000 draws within 3%."""
    log_w = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64).log()
    generator = torch.Generator().manual_seed(0)
    counts = sum(torch.bincount(mcmc.systematic_resample(log_w, generator)[0], minlength=4).double()
                 for _ in range(2000)) / 2000
    assert torch.allclose(counts, torch.tensor([0.4, 0.8, 1.2, 1.6], dtype=torch.float64), rtol=0.03), counts


def test_parallel_tempering_sampler_and_sampler_options():
    """sample(sampler='parallel_tempering') returns the T = 1 chain with the mode weights within 0.08
    and logs its swap rates; each sampler's own options are refused by the others."""
    mixture = _mixture(2)
    model, _ = _model(mixture, 2)
    x = model.sample(1000, sampler="parallel_tempering", step_size=0.2, steps=300, replicas=8, max_temperature=30.0,
                     generator=torch.Generator().manual_seed(3))
    weights = _mode_weights(mixture, x)
    assert torch.all((weights - torch.tensor(WEIGHTS, dtype=torch.float64)).abs() < 0.08), weights
    rates = model.last_sample_diagnostics["swap_rate"]
    assert rates.shape == (7,) and bool((rates > 0.2).all()), rates
    with pytest.raises(ValueError, match="the mala sampler has no option 'islands'"):
        model.sample(4, sampler="mala", islands=2)
    with pytest.raises(ValueError, match="the smc sampler has no option 'replicas'"):
        model.sample(4, replicas=2)
    with pytest.raises(ValueError, match="init='buffer': the smc sampler draws its own start"):
        model.sample(4, sampler="smc", init="buffer")
    with pytest.raises(ValueError, match="cannot run the CD negatives"):
        EBM(MixtureEnergy(mixture, 0.0), data_shape=(2,), sampler="smc")


def test_sample_logs_the_swap_rates_and_smc_log_z(caplog):
    """sample() logs parallel tempering's swap rates and SMC's log Z at INFO; a chain sampler clears
    the diagnostics of the call before."""
    mixture = _mixture(2)
    model, _ = _model(mixture, 2)
    with caplog.at_level("INFO", logger="lightning_diffusion.models.ebm"):
        model.sample(64, sampler="parallel_tempering", steps=5, replicas=3, generator=torch.Generator().manual_seed(0))
        model.sample(64, steps=5, generator=torch.Generator().manual_seed(0))
    assert "swap rates [" in caplog.text and "log Z " in caplog.text, caplog.text
    model.sample(8, sampler="mala", steps=2)
    assert model.last_sample_diagnostics is None
