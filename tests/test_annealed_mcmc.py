"""The MCMC-corrected annealed sampler (``annealed_mcmc``, issue 23 item 2) against ground truth:
the exact energy ``-log p_t`` of a Gaussian mixture at every noise level (``MixtureOracle.energy``).

The mixture has unequal weights (0.7, 0.2, 0.1), where few-step reverse diffusion visibly biases
the mode weights towards the heavy mode. Measured with 4000 samples on the VP SDE (4 seeds; the
energy distance between two exact draws is about 0.0015):

- same grid of 5 levels: ancestral (K = 0) ED 0.10, mode-weight z 14; K = 20 MALA moves per level
  ED 0.04, z 1.7 (the rest is the width error of the last reverse step, where sigma_t, and with it the step, is ~0);
- equal NFE against the reverse SDE with Song et al.'s unadjusted Langevin corrector (``pc``, one
  corrector step per level): 13 NFE ED 0.037 vs 0.097, z 6.4 vs 21; 39 NFE ED 0.0067 vs 0.0095,
  z 2.0 vs 6.9;
- but with the exact energy, spending the same NFE on more reverse steps is better still:
  ancestral at 39 steps ED 0.0047, Euler-Maruyama 0.0017 (README, "MCMC-corrected annealed sampling").
"""

from __future__ import annotations

import pytest
import torch

from lightning_diffusion import DDPM, MLP
from lightning_diffusion.diffusion import samplers
from lightning_diffusion.diffusion.mixture import GaussianMixture, MixtureOracle
from lightning_diffusion.diffusion.samplers import sample
from lightning_diffusion.diffusion.sde import VPSDE, DiscreteVP
from lightning_diffusion.diffusion.schedules import NoiseSchedule
from lightning_diffusion.errors import OptionError
from lightning_diffusion.metrics import energy_distance

N = 4000


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mixture() -> GaussianMixture:
    return GaussianMixture(torch.tensor([[-1.5, 0.0], [1.5, 0.0], [0.0, 1.5]]), torch.tensor([0.2, 0.2, 0.2]),
                           torch.tensor([0.7, 0.2, 0.1]))


def denoiser(mix: GaussianMixture, process):
    return lambda x, t: mix.denoise(x, process.alpha(t), process.sigma(t)).float()


def draw(name: str, steps: int, seed: int = 0, process=None, **options) -> samplers.SamplerOutput:
    mix, process = mixture(), process or VPSDE()
    energy = MixtureOracle(mix, process).energy if samplers.registered(name).needs_energy else None
    return sample(name, denoiser(mix, process), process, (N, 2), steps=steps, energy_fn=energy,
                  generator=torch.Generator().manual_seed(seed), **options)


def errors(x: torch.Tensor) -> tuple[float, float]:
    """(energy distance to exact draws, the largest mode-weight error in binomial standard deviations)."""
    mix = mixture()
    ref = mix.sample(N, torch.Generator().manual_seed(1))[0]
    x = x.double()
    freq = torch.bincount(torch.cdist(x, mix.means).argmin(1), minlength=3).double() / len(x)
    z = ((freq - mix.weights).abs() / (mix.weights * (1 - mix.weights) / len(x)).sqrt()).max()
    return energy_distance(x, ref), float(z)


def mean_errors(name: str, steps: int, seeds: int = 3, **options) -> tuple[float, float]:
    runs = [errors(draw(name, steps, seed, **options).x) for seed in range(seeds)]
    return sum(r[0] for r in runs) / seeds, sum(r[1] for r in runs) / seeds


# -- (a) the correction against ground truth --------------------------------------------------------
def test_without_moves_it_is_ancestral_sampling_on_the_energys_denoiser():
    """K = 0: the reverse step is ancestral's, with Tweedie's x0_hat from -grad E: the same samples."""
    corrected, plain = draw("annealed_mcmc", 10, mcmc_steps=0), draw("ancestral", 10)
    assert corrected.nfe == plain.nfe == 10
    assert torch.allclose(corrected.x, plain.x, atol=1e-4)


def test_mala_moves_correct_the_mode_weights_of_a_coarse_reverse_process():
    """On the same 5-level grid, 20 MALA moves per level bring the biased weights (0.795 on the 0.7
    mode) back to the mixture's and more than halve the energy distance."""
    ed_plain, z_plain = errors(draw("annealed_mcmc", 5, mcmc_steps=0).x)
    ed_mala, z_mala = errors(draw("annealed_mcmc", 5, mcmc_steps=20, step_scale=0.5).x)
    assert z_plain > 10 and z_mala < 4
    assert ed_mala < 0.5 * ed_plain


@pytest.mark.parametrize("levels", [7, 20])
def test_mala_corrector_beats_the_unadjusted_langevin_corrector_at_equal_nfe(levels):
    """Equal NFE (2 L - 1): L levels with one MALA move each against the reverse SDE with one
    unadjusted Langevin corrector step per level (Song et al.'s pc): lower energy distance and
    mode-weight error (mean of 3 seeds)."""
    mala = mean_errors("annealed_mcmc", levels, mcmc_steps=1, step_scale=1.0)
    pc = mean_errors("pc", levels)
    assert draw("annealed_mcmc", levels, mcmc_steps=1).nfe == draw("pc", levels).nfe == 2 * levels - 1
    assert mala[0] < 0.8 * pc[0] and mala[1] < 0.5 * pc[1]


def test_metropolis_keeps_a_large_step_exact_where_ula_is_biased():
    """At step_scale 2 the unadjusted moves overshoot (the heavy mode drops to ~0.5), MALA's test keeps the weights."""
    ed_mala, z_mala = errors(draw("annealed_mcmc", 5, mcmc_steps=2, step_scale=2.0, kernel="mala").x)
    ed_ula, z_ula = errors(draw("annealed_mcmc", 5, mcmc_steps=2, step_scale=2.0, kernel="ula").x)
    assert ed_ula > 2 * ed_mala and z_ula > 2 * z_mala


def test_hmc_moves_correct_the_mode_weights_too():
    ed_plain, z_plain = errors(draw("annealed_mcmc", 5, mcmc_steps=0).x)
    ed_hmc, z_hmc = errors(draw("annealed_mcmc", 5, mcmc_steps=5, step_scale=0.25, kernel="hmc",
                                leapfrog_steps=3).x)
    assert z_hmc < 0.5 * z_plain and ed_hmc < 0.6 * ed_plain


# -- (b) acceptance ------------------------------------------------------------------------------
def acceptance(step_scale: float, kernel: str = "mala") -> list[float]:
    seen: list[dict] = []
    mix, process = mixture(), VPSDE()
    sample("annealed_mcmc", None, process, (1000, 2), steps=10, mcmc_steps=2, step_scale=step_scale, kernel=kernel,
           energy_fn=MixtureOracle(mix, process).energy, generator=torch.Generator().manual_seed(0),
           callback=seen.append)
    assert [s["i"] for s in seen] == list(range(10)) and seen[0]["acceptance"] == 1.0  # no moves at the prior
    return [s["acceptance"] for s in seen[1:]]


def test_mala_acceptance_tends_to_one_at_small_steps_and_falls_as_they_grow():
    per_level = {c: acceptance(c) for c in (1e-4, 0.05, 1.0, 4.0)}
    assert min(per_level[1e-4]) > 0.98
    means = [sum(v) / len(v) for v in per_level.values()]
    assert all(a > b for a, b in zip(means, means[1:])) and means[-1] < 0.6


def test_ula_reports_acceptance_one():
    assert acceptance(1.0, "ula") == [1.0] * 9


# -- (c) NFE --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kernel", "options", "per_move"), [("ula", {}, 1), ("mala", {}, 1),
                                                            ("hmc", {"leapfrog_steps": 4}, 4)])
@pytest.mark.parametrize("process", ["vp", "ddpm"])
def test_nfe_counts_every_energy_and_gradient_evaluation(kernel, options, per_move, process):
    proc = VPSDE() if process == "vp" else DiscreteVP(NoiseSchedule("linear", 100))
    calls = []

    def energy(x, t):
        calls.append(x.shape[0])
        return MixtureOracle(mixture(), proc).energy(x, t)

    def no_denoiser(x, t):
        raise AssertionError("annealed_mcmc takes x0_hat from the energy's gradient, not from denoise_fn")

    out = sample("annealed_mcmc", no_denoiser, proc, (16, 2), steps=7, mcmc_steps=3, kernel=kernel,
                 energy_fn=energy, generator=torch.Generator().manual_seed(0), **options)
    assert out.nfe == len(calls) == 7 + 6 * 3 * per_move
    assert torch.isfinite(out.x).all()


def test_default_steps():
    out = draw("annealed_mcmc", None, mcmc_steps=0)
    assert out.nfe == 100


# -- (d) options ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("options", "message"), [
    ({"kernel": "gibbs"}, r"kernel='gibbs': must be one of \['ula', 'mala', 'hmc'\]"),
    ({"mcmc_steps": -1}, r"mcmc_steps=-1: must be an integer >= 0"),
    ({"mcmc_steps": 1.5}, r"mcmc_steps=1.5: must be an integer >= 0"),
    ({"step_scale": 0.0}, r"step_scale=0.0: must be a number > 0"),
    ({"leapfrog_steps": 0}, r"leapfrog_steps=0: must be an integer >= 1"),
    ({"leapfrog": 3}, r"no option 'leapfrog' \(did you mean leapfrog_steps\?\)"),
    ({"energy_fn": None}, r"energy_fn=None: the annealed_mcmc sampler has no option 'energy_fn'"),
])
def test_bad_options_are_refused_by_name(options, message):
    with pytest.raises(OptionError, match=message):
        samplers.check_options("annealed_mcmc", VPSDE(), 10, energy=True, **options)


def test_good_options_are_accepted():
    samplers.check_options("annealed_mcmc", VPSDE(), 10, energy=True, kernel="hmc", mcmc_steps=0, step_scale=0.3,
                           leapfrog_steps=2, variance="fixedlarge")
    assert samplers.sampler_options("annealed_mcmc") == ["kernel", "mcmc_steps", "step_scale", "leapfrog_steps",
                                                          "variance"]


def test_a_sampler_that_needs_an_energy_is_refused_without_one():
    with pytest.raises(OptionError, match=r"sampler='annealed_mcmc': the annealed_mcmc sampler runs MCMC on the "
                                          r"model's energy .* parameterization: energy, or choose .*ancestral"):
        sample("annealed_mcmc", lambda x, t: x, VPSDE(), (4, 2), steps=5)


def test_a_model_without_an_energy_refuses_the_sampler_by_name():
    model = DDPM(MLP(hidden=16, num_layers=1), timesteps=10, data_shape=(2,))  # parameterization eps
    for call in (lambda: model.check_sample_options(sampler="annealed_mcmc"),
                 lambda: model.sample(4, sampler="annealed_mcmc")):
        with pytest.raises(OptionError, match=r"sampler='annealed_mcmc'.*this model has none; train a model with "
                                              r"parameterization: energy"):
            call()


def test_a_model_with_an_energy_samples_and_records_acceptance_per_level(monkeypatch):
    """The driver passes the model's energy and stores last_sample_nfe and last_sample_acceptance."""
    model = DDPM(MLP(hidden=16, num_layers=1), timesteps=10, data_shape=(2,))
    energy = MixtureOracle(mixture(), model.process).energy
    monkeypatch.setattr(model, "sampling_energy", lambda y=None, guidance_scale=1.0: lambda x, t: energy(x, t, y))
    model.check_sample_options(sampler="annealed_mcmc", mcmc_steps=2, kernel="mala")
    seen = []
    x = model.sample(64, sampler="annealed_mcmc", steps=10, mcmc_steps=2, step_scale=1e-4, callback=seen.append,
                     generator=torch.Generator().manual_seed(0))
    assert x.shape == (64, 2) and model.last_sample_nfe == 10 + 9 * 2 and len(seen) == 10
    assert len(model.last_sample_acceptance) == 9 and min(model.last_sample_acceptance) > 0.98
    model.sample(4, sampler="ddim", steps=5)
    assert model.last_sample_acceptance is None
    conditional = DDPM(MLP(hidden=16, num_layers=1, num_classes=3), timesteps=10, data_shape=(2,), num_classes=3,
                       class_conditional=True)
    monkeypatch.setattr(conditional, "sampling_energy", lambda y=None, guidance_scale=1.0: lambda x, t: energy(x, t, y))
    # guidance of an energy is an energy (E_null + w (E_y - E_null)): accepted (tests/test_compose.py checks its value)
    conditional.check_sample_options(sampler="annealed_mcmc", guidance_scale=2.0)
