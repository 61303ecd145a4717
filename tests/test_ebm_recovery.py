"""The EBM's ``recovery`` objective (diffusion recovery likelihood, Gao et al. 2021) against exact
ground truth: the ladder against the reference code's numbers, each level's conditional EBM with the
exact Gaussian energy plugged in sampled by the model's own chains against the Bayes posterior, a
short fit on a 2-D toy whose ladder samples approach the data (energy distance against a noise
floor), exact resume through the CLI, and options the objective refuses."""

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import run_cli
from tiny import shrink_config
from lightning_diffusion import mcmc
from lightning_diffusion.diffusion.mixture import GaussianMixture
from lightning_diffusion.metrics.quality import energy_distance
from lightning_diffusion.models.ebm import EBM
from lightning_diffusion.nets.energy import EnergyConvNet, EnergyMLP

pytestmark = pytest.mark.usefixtures("one_thread")

MEAN, VAR = torch.tensor([0.7, -0.4]), 0.3**2  # the data: N(MEAN, VAR I) in 2-D


def test_ladder_is_the_reference_codes():
    """``recovery_ladder(6)``: ``a`` of each jump is the product of ``sqrt(1 - beta)`` over 1000 linear
    betas (1e-4 .. 0.02) cut at steps 0, 100, ..., 500, 999 (reference ``get_sigma_schedule``), here
    recomputed step by step in float64; the top level has no Gaussian term and scale 1."""
    ladder = mcmc.recovery_ladder(6)
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    cuts = [(0, 0), (1, 100), (101, 200), (201, 300), (301, 400), (401, 500), (501, 999)]
    a = [math.prod(math.sqrt(1 - betas[i]) for i in range(s, e + 1)) for s, e in cuts]
    abar = [math.prod(a[:i + 1]) for i in range(7)]
    assert ladder.levels == 6
    torch.testing.assert_close(ladder.step_scale, torch.tensor(a[1:], dtype=torch.float64))
    torch.testing.assert_close(ladder.signal, torch.tensor(abar[:6], dtype=torch.float64))
    torch.testing.assert_close(ladder.noise, torch.tensor([math.sqrt(1 - v**2) for v in abar[:6]], dtype=torch.float64))
    sigma = [math.sqrt(1 - v**2) for v in a]
    steps = [sigma[t + 1] * math.sqrt(math.sqrt(1 - abar[t]**2) / math.sqrt(1 - abar[0]**2)) for t in range(6)]
    torch.testing.assert_close(ladder.langevin_step, torch.tensor(steps, dtype=torch.float64))
    assert ladder.y_scale[-1] == 1 and ladder.conditional.tolist() == [1, 1, 1, 1, 1, 0]
    assert ladder.noise[0] == pytest.approx(0.01, rel=1e-3) and ladder.step_scale[-1] < 0.03  # x_6 is nearly N(0, I)


class ExactLevelEnergy(nn.Module):
    """``net(y, t) = s_t^2 E(y, t)`` with ``E(y, t) = ||y - c_t m_t||^2 / (2 c_t^2 v_t)``, the exact
    energy of ``y = c_t x_t`` for Gaussian data (``x_t ~ N(m_t, v_t I)``, ``m_t = abar_t m``,
    ``v_t = abar_t^2 v + sigmabar_t^2``), so that the model's ``E = net / s_t^2`` is exact."""

    data_kind = "points"

    def __init__(self, ladder, step_factor: float, mean: torch.Tensor = MEAN):
        super().__init__()
        self.ladder, self.step_factor, self.mean = ladder, step_factor, mean
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, y, t):
        t = t.long()
        c = self.ladder.y_scale[t].to(y)[:, None]
        m = self.ladder.signal[t].to(y)[:, None] * self.mean.to(y)
        v = (self.ladder.signal[t] ** 2 * VAR + self.ladder.noise[t] ** 2).to(y)
        s2 = (self.step_factor * self.ladder.langevin_step[t]).to(y) ** 2
        return s2 * (y - c * m).pow(2).sum(1) / (2 * c[:, 0] ** 2 * v) + 0 * self.dummy


@pytest.mark.parametrize("level", [0, 2, 5])
def test_conditional_chains_match_the_bayes_posterior(level):
    """With the exact energy plugged in, the model's negatives of level t (MALA on its conditional EBM
    from x_{t+1}, returned as x_t) have the Bayes posterior of x_t given x_{t+1}, derived in x_t's
    own coordinates: precision ``1 / v_t + a^2 / sigma^2``, mean ``(m_t / v_t + a x_{t+1} / sigma^2) /
    precision`` (the top level: the marginal N(m_t, v_t)). 4000 chains; the means within 4 standard
    errors, the variances within 4 of theirs (sqrt(2 / N) relative) + 2%. The step factor is set per
    level so that the step is 2/3 of the posterior's std (the paper's b = 0.014 would need
    thousands of steps to mix a Gaussian; here the point is the conditional's construction)."""
    ladder = mcmc.recovery_ladder(6)
    m_t, v_t = ladder.signal[level].item() * MEAN, ladder.signal[level].item() ** 2 * VAR + ladder.noise[level].item() ** 2
    a, sigma2 = ladder.step_scale[level].item(), ladder.step_noise[level].item() ** 2
    top = level == ladder.levels - 1
    x_next = torch.tensor([0.3, 0.2])
    precision = 1 / v_t + (0 if top else a**2 / sigma2)
    mean = (m_t / v_t + (0 if top else a * x_next / sigma2)) / precision
    std_y = ladder.y_scale[level].item() / math.sqrt(precision)  # the chains run in y = c x_t
    factor = std_y / 1.5 / ladder.langevin_step[level].item()
    model = EBM(ExactLevelEnergy(ladder, factor), objective="recovery", data_shape=(2,), sampler="mala",
                recovery_step_factor=factor, recovery_steps=300)
    n = 4000
    level_t = torch.full((n,), level, dtype=torch.long)
    out = mcmc.recovery_langevin(model.level_energy, x_next.expand(n, 2).clone(), level_t, model.ladder,
                                 step_factor=model.recovery_step_factor, steps=model.recovery_steps, metropolis=True,
                                 generator=torch.Generator().manual_seed(level))
    x = out.x.double()
    assert 0.5 < out.acceptance < 1
    se = math.sqrt(1 / precision / n)
    assert torch.all((x.mean(0) - mean.double()).abs() < 4 * se), (x.mean(0), mean, se)
    assert torch.all((x.var(0) * precision - 1).abs() < 4 * math.sqrt(2 / n) + 0.02), (x.var(0), 1 / precision)


@pytest.mark.parametrize("dim", [2, 3])
def test_bits_per_dim_of_the_exact_energy_is_the_lowest_levels_nll(dim):
    """With the exact level energies plugged in, ``bits_per_dim(estimator="level0")`` is the exact NLL of x_0 ~ N(abar_0 m,
    (abar_0^2 v + sigmabar_0^2) I), whatever the energy's constant: 2-D points by quadrature
    (``exact-quadrature-level0``, to 1e-3 bits/dim), 3-D points by AIS (``ais-logZ-level0``, at the
    default AIS step, the lowest level's Langevin step in data units: within 4 standard errors of
    log Z + 0.05 nats)."""
    torch.manual_seed(0)
    ladder = mcmc.recovery_ladder(6)
    mean = torch.tensor([0.7, -0.4, 0.2])[:dim]
    b = 0.05
    model = EBM(ExactLevelEnergy(ladder, b, mean), objective="recovery", data_shape=(dim,), recovery_step_factor=b,
                quadrature_points=801, ais_chains=512, ais_steps=300)
    data = mean + 0.3 * torch.randn(2000, dim)
    model.fit_base(data)
    m0, v0 = ladder.signal[0].item() * mean, ladder.signal[0].item() ** 2 * VAR + ladder.noise[0].item() ** 2
    x = data[:200]
    exact = ((x - m0).pow(2).sum(1) / (2 * v0) + dim / 2 * math.log(2 * math.pi * v0)) / (dim * math.log(2))
    bits = model.bits_per_dim(x, estimator="level0", generator=torch.Generator().manual_seed(1))
    log_z, stderr, method = model.log_partition()
    if dim == 2:
        assert model.bpd_estimator(estimator="level0") == "exact-quadrature-level0" and method == "quadrature"
        torch.testing.assert_close(bits.double(), exact.double(), atol=1e-3, rtol=0)
    else:
        assert model.bpd_estimator(estimator="level0") == "ais-logZ-level0" and method == "ais"
        gap = float((bits - exact).mean()) * dim * math.log(2)  # nats: log Z's error
        assert abs(gap) < 4 * stderr + 0.05, (gap, stderr)


def _closed_form_log_z(ladder, level: int, x_next: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``log ∫ exp(-||y - c m_t||^2 / (2A) - ||y - x_{t+1}||^2 / (2B)) dy`` [B] with ``A = c^2 v_t``,
    ``B = sigma_{t+1}^2`` (the top level: the first factor alone): ExactLevelEnergy's conditional."""
    dim = x_next.shape[1]
    c, abar, noise = (ladder.y_scale[level].item(), ladder.signal[level].item(), ladder.noise[level].item())
    a_var = c**2 * (abar**2 * VAR + noise**2)
    if level == ladder.levels - 1:
        return torch.full((x_next.shape[0],), dim / 2 * math.log(2 * math.pi * a_var), dtype=torch.float64)
    b_var = ladder.step_noise[level].item() ** 2
    gap = (x_next.double() - c * abar * mean.double()).pow(2).sum(1)
    return dim / 2 * math.log(2 * math.pi * a_var * b_var / (a_var + b_var)) - gap / (2 * (a_var + b_var))


@pytest.mark.parametrize("level", [0, 3, 5])
def test_conditional_log_normalizers_match_the_closed_form(level):
    """``mcmc.recovery_log_normalizers`` with the exact Gaussian energy plugged in: each conditional's
    log Z against its closed form (a product of two Gaussians), 8 values of x_{t+1} in 3-D, 64 chains
    of 100 bridges each. Below the top level from the conditional's Gaussian part N(x_{t+1}, sigma^2)
    (the default base: at level 0 the target is 3x narrower per axis, log Z 1.7 nats below the
    base's, so the annealing matters); the top level (no Gaussian part) from a base 1.5x too wide and
    off-centre. Each estimate within 5 of its standard errors + 0.02 nats, and the mean error within
    4 of its standard errors + 0.01 nats (measured at the top level: stderr 0.036 nats per estimate;
    a wrong normaliser, e.g. a missing log det of the whitening, is off by > 1 nat)."""
    ladder = mcmc.recovery_ladder(6)
    mean = torch.tensor([0.7, -0.4, 0.2])
    factor = 0.05
    model = EBM(ExactLevelEnergy(ladder, factor, mean), objective="recovery", data_shape=(3,),
                recovery_step_factor=factor)
    x_next = torch.randn(8, 3, generator=torch.Generator().manual_seed(level)) * 0.8
    levels = torch.full((8,), level, dtype=torch.long)
    base = {}
    if level == ladder.levels - 1:
        exact_std = math.sqrt(ladder.signal[level].item() ** 2 * VAR + ladder.noise[level].item() ** 2)
        base = {"base_mean": torch.full((8, 3), 0.3), "base_std": torch.full((8, 3), 1.5 * exact_std)}
    with pytest.raises(ValueError, match="the top level has no Gaussian term"):
        mcmc.recovery_log_normalizers(model.level_energy, x_next, torch.full((8,), 5), ladder, chains=4, step_size=0.5)
    out = mcmc.recovery_log_normalizers(model.level_energy, x_next, levels, ladder, chains=64, step_size=0.5, betas=100,
                                        generator=torch.Generator().manual_seed(10 + level), **base)
    exact = _closed_form_log_z(ladder, level, x_next, mean)
    error = out.log_z - exact
    assert out.log_weights.shape == (8, 64) and 0.5 < out.acceptance <= 1
    assert torch.all(error.abs() < 5 * out.stderr + 0.02), (error, out.stderr)
    assert abs(float(error.mean())) < 4 * float(out.stderr.mean()) / math.sqrt(8) + 0.01, (error, out.stderr)
    if level == 0:  # the conditional is not its Gaussian part: log Z differs from the part's normaliser
        gaussian_part = 1.5 * math.log(2 * math.pi * ladder.step_noise[0].item() ** 2)
        assert float((exact - gaussian_part).mean()) < -1.0


@pytest.mark.parametrize("fitted", [True, False])
def test_ladder_bound_of_the_exact_energies_is_the_exact_nll(fitted):
    """``bits_per_dim`` (default ``recovery-ais``) with the exact level energies of Gaussian data
    N(m, 0.3^2 I) in 3-D: the model's joint is then the forward process's, so the bound's integrand
    is ``-log q(x_0)`` for every draw of the forward chain (no slack) and the estimate must be the
    exact NLL of x_0 ~ N(abar_0 m, v_0 I) up to AIS's error: per sample within 0.05 nats (1 nat
    unfitted), on the mean over 100 samples within 4 of its standard errors (from the reported
    per-conditional AIS stderr) + 0.01 nats. With the base fitted to the data (AIS
    starts near each conditional) and with an unfitted base (N(0, I): AIS must anneal every level).
    A wrong term is far outside this: the Jacobians ``D log a_{t+1}`` sum to -3.8 nats, the top
    level's log Z is 2.6 nats."""
    torch.manual_seed(0)
    ladder = mcmc.recovery_ladder(6)
    mean, dim = torch.tensor([0.7, -0.4, 0.2]), 3
    model = EBM(ExactLevelEnergy(ladder, 0.05, mean), objective="recovery", data_shape=(dim,), recovery_step_factor=0.05)
    data = mean + 0.3 * torch.randn(2000, dim)
    if fitted:
        model.fit_base(data)
    m0, v0 = ladder.signal[0].item() * mean, ladder.signal[0].item() ** 2 * VAR + ladder.noise[0].item() ** 2
    x = data[:100]
    exact = (x - m0).pow(2).sum(1) / (2 * v0) + dim / 2 * math.log(2 * math.pi * v0)
    assert model.bpd_estimator() == "recovery-ais"
    bits = model.bits_per_dim(x, recovery_ais_chains=32, generator=torch.Generator().manual_seed(1))
    nll = bits.double() * dim * math.log(2)
    error = nll - exact.double()
    stderr = model.last_bound["stderr_bpd"] * dim * math.log(2)
    assert model.last_bound["bpd"] == pytest.approx(float(bits.mean()), rel=1e-5)
    # per sample: AIS's noise over 5 conditionals (measured: stderr 0.0013 nats per conditional fitted, 0.06 unfitted)
    assert float(error.abs().max()) < (0.05 if fitted else 1.0), error
    mean_se = math.sqrt(ladder.levels - 1) * model.last_bound["conditional_stderr"] / math.sqrt(len(x))
    assert abs(float(error.mean())) < 4 * mean_se + 0.01, (error.mean(), mean_se)
    assert 0 < stderr < 1  # the spread of the NLL over the 100 samples (exact: 0.14 nats)


def test_recovery_estimator_options():
    """``estimator="level0"`` keeps the old estimate under its old name; the recovery AIS options
    are refused with it and with other objectives; an unknown estimator is named."""
    ladder = mcmc.recovery_ladder(6)
    model = EBM(ExactLevelEnergy(ladder, 0.05), objective="recovery", data_shape=(2,), recovery_step_factor=0.05,
                quadrature_points=101)
    assert model.bpd_estimator(estimator="level0") == "exact-quadrature-level0"
    x = torch.randn(4, 2)
    assert model.bits_per_dim(x, estimator="level0").shape == (4,)
    with pytest.raises(ValueError, match="recovery_ais_chains=8: is an option of estimator='recovery-ais'"):
        model.bits_per_dim(x, estimator="level0", recovery_ais_chains=8)
    with pytest.raises(ValueError, match="unknown estimator"):
        model.bits_per_dim(x, estimator="ais")
    cd = EBM(EnergyMLP(2, 16, 1), data_shape=(2,))
    with pytest.raises(ValueError, match="has one estimator"):
        cd.bits_per_dim(x, estimator="level0")
    with pytest.raises(ValueError, match="recovery_ais_steps"):
        cd.bits_per_dim(x, recovery_ais_steps=3)


def _mixture_points(n: int, seed: int) -> torch.Tensor:
    return GaussianMixture.circle().sample(n, torch.Generator().manual_seed(seed))[0].float()


def test_short_fit_brings_ladder_samples_to_the_data():
    """400 steps on the circle mixture (EnergyMLP 64x2 with a level embedding, the paper's ladder,
    K = 30, b = 0.05, Adam 2e-3): the energy distance of 2000 ladder samples to 2000 held-out points
    falls from 14.5 (the untrained net's) to 0.038 (measured), under 0.6x that of the Gaussian fitted
    to the data (0.096: the modes are found, not only the moments). The noise floor, the distance
    between two independent data sets of that size, is 0.002: 400 short-run steps are not
    converged (the distance moves between 11x and 30x the floor from one checkpoint to the next)."""
    torch.manual_seed(0)
    model = EBM(EnergyMLP(2, 64, 2, time_embed_dim=32), objective="recovery", data_shape=(2,),
                recovery_step_factor=0.05)
    model.fit_base(_mixture_points(2000, 0))
    held_out = _mixture_points(2000, 1)
    floor = energy_distance(held_out, _mixture_points(2000, 2))
    gaussian = energy_distance(model.base().sample(2000, torch.Generator().manual_seed(4)), held_out)

    def distance() -> float:
        return energy_distance(model.sample(2000, generator=torch.Generator().manual_seed(3)), held_out)

    before = distance()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for step in range(400):
        loss = model.loss({"x": _mixture_points(256, 100 + step)})
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = distance()
    assert floor < 0.005 and gaussian > 20 * floor, (floor, gaussian)  # the bar is far above the noise floor
    assert after < 0.6 * gaussian and after < before / 100, (before, after, gaussian, floor)


def test_options_that_make_no_sense_are_refused():
    net = EnergyMLP(2, 16, 1, time_embed_dim=8)
    with pytest.raises(ValueError, match="built without a time input: build it with time_embed_dim"):
        EBM(EnergyMLP(2, 16, 1), objective="recovery", data_shape=(2,))
    with pytest.raises(ValueError, match="buffer_size=100 has no meaning for objective='recovery'"):
        EBM(net, objective="recovery", data_shape=(2,), buffer_size=100)
    with pytest.raises(ValueError, match="whiten_chains=True has no meaning"):
        EBM(net, objective="recovery", data_shape=(2,), whiten_chains=True)
    with pytest.raises(ValueError, match="sampler='decoupled' cannot run objective='recovery''s negatives"):
        EBM(net, objective="recovery", data_shape=(2,), sampler="decoupled")
    with pytest.raises(ValueError, match="recovery_levels=4 is an option of objective='recovery'"):
        EBM(EnergyMLP(2, 16, 1), objective="cd", data_shape=(2,), recovery_levels=4)
    with pytest.raises(ValueError, match="recovery_levels"):
        EBM(net, objective="recovery", data_shape=(2,), recovery_levels=1)
    with pytest.raises(ValueError, match="recovery_step_factor"):
        EBM(net, objective="recovery", data_shape=(2,), recovery_step_factor=0.0)
    with pytest.raises(ValueError, match="already has parametrized layers"):
        EBM(EnergyMLP(2, 16, 1, spectral_norm=True, time_embed_dim=8), objective="recovery", data_shape=(2,),
            spectral_norm=True)
    model = EBM(net, objective="recovery", data_shape=(2,), recovery_steps=2)
    model.fit_base(_mixture_points(100, 0))
    with pytest.raises(ValueError, match="init='buffer': objective='recovery' keeps no replay buffer"):
        model.sample(4, init="buffer")
    cd = EBM(EnergyMLP(2, 16, 1), data_shape=(2,))
    with pytest.raises(ValueError, match="sampler='recovery': the recovery ladder exists only for objective='recovery'"):
        cd.sample(4, sampler="recovery")
    # the ladder is the default, other samplers draw the lowest level's marginal; the estimator is named
    assert model.sample(4, generator=torch.Generator().manual_seed(0)).shape == (4, 2)
    assert model.sample(4, sampler="mala", steps=3, generator=torch.Generator().manual_seed(0)).shape == (4, 2)
    assert model.bpd_estimator() == "recovery-ais"
    assert model.bpd_estimator(estimator="level0") == "exact-quadrature-level0"
    assert "recovery_step_factor" in model.resume_fixed_hparams and "recovery_levels" not in cd.resume_fixed_hparams
    with pytest.raises(ValueError, match="recovery_sample_step_factor"):
        EBM(net, objective="recovery", data_shape=(2,), recovery_sample_step_factor=-0.1)
    with pytest.raises(ValueError, match="recovery_sample_step_factor=0.1 is an option of objective='recovery'"):
        EBM(EnergyMLP(2, 16, 1), objective="cd", data_shape=(2,), recovery_sample_step_factor=0.1)


def test_the_sampling_step_factor_is_samples_default_step_and_training_keeps_its_own():
    """recovery_sample_step_factor is sample()'s default b (the same draws as step_size=b given), while
    the training chains keep recovery_step_factor."""
    net = EnergyMLP(2, 16, 1, time_embed_dim=8)
    plain = EBM(net, objective="recovery", data_shape=(2,), recovery_steps=3, recovery_step_factor=0.05)
    wide = EBM(net, objective="recovery", data_shape=(2,), recovery_steps=3, recovery_step_factor=0.05,
               recovery_sample_step_factor=0.1)
    draw = lambda model, **kw: model.sample(8, generator=torch.Generator().manual_seed(0), **kw)  # noqa: E731
    assert torch.equal(draw(wide), draw(plain, step_size=0.1))
    assert not torch.equal(draw(wide), draw(plain))
    assert torch.equal(draw(wide, step_size=0.05), draw(plain))
    y, level = torch.randn(3, 2), torch.zeros(3, dtype=torch.long)
    assert torch.equal(wide.level_energy(y, level), plain.level_energy(y, level))  # the energy's scale: b of training


def test_divergence_guard_names_the_recovery_options():
    """The guard bounds the net's output (E = net / s_t^2 grows with 1 / s_t^2) and names the step size
    option of the objective when the chains or the energies blow up."""

    class Huge(ExactLevelEnergy):
        def forward(self, y, t):
            return 1e6 * (1 + 0 * y.sum(1)) + 0 * self.dummy

    ladder = mcmc.recovery_ladder(6)
    model = EBM(Huge(ladder, 0.01), objective="recovery", data_shape=(2,), recovery_steps=2)
    with pytest.raises(FloatingPointError, match=r"max \|net\(y, t\)\| = 1e\+06 .* Lower model.lr or model.recovery_step_factor"):
        model.loss({"x": _mixture_points(64, 0)})

    class Steep(ExactLevelEnergy):
        def forward(self, y, t):
            return 1e30 * y.pow(4).sum(1) + 0 * self.dummy

    model = EBM(Steep(ladder, 0.01), objective="recovery", data_shape=(2,), recovery_steps=5, max_energy=float("inf"))
    with pytest.raises(FloatingPointError, match="non-finite chain states after 5 langevin steps of recovery_step_factor"):
        model.loss({"x": _mixture_points(64, 0)})


def test_spectral_norm_option_and_level_conditioned_nets():
    """``spectral_norm=True`` parametrizes every Linear/Conv of the net (spectral norm 1 in eval);
    the level-conditioned nets give different energies at different levels and refuse a missing t."""
    torch.manual_seed(0)  # the power iteration's start vector: not whatever the tests before left
    net = EnergyConvNet(1, 8, (8, 16), time_embed_dim=16)
    model = EBM(net, objective="recovery", data_shape=(1, 8, 8), spectral_norm=True)
    from torch.nn.utils import parametrize

    layers = [m for m in model.net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert layers and all(parametrize.is_parametrized(m, "weight") for m in layers)
    lin = next(m for m in layers if isinstance(m, nn.Linear))
    model.train()
    for _ in range(200):  # power iterations (converging at the rate of the top two singular values' ratio)
        lin.weight
    model.eval()
    assert torch.linalg.matrix_norm(lin.weight.detach(), ord=2) == pytest.approx(1.0, abs=1e-3)
    x = torch.randn(3, 1, 8, 8)
    e0, e3 = model.net(x, torch.zeros(3)), model.net(x, torch.full((3,), 3.0))
    assert e0.shape == (3,) and not torch.allclose(e0, e3)
    with pytest.raises(ValueError, match="call it as net\\(x, t\\)"):
        net(x)
    with pytest.raises(ValueError, match="built without time_embed_dim"):
        EnergyConvNet(1, 8, (8,))(x, torch.zeros(3))


CONFIG = "ebm_recovery_digits"


def _tiny_config(path: Path, steps: int) -> Path:
    """configs/ebm_recovery_digits.yaml, tiny: a narrower net, 8-image batches, 3 Langevin steps per
    level, 2 batches per epoch (a checkpoint at every epoch's end), a 16-image grid."""
    return shrink_config(CONFIG, path, {
        "trainer.max_steps": steps, "trainer.logger": False, "trainer.enable_progress_bar": False,
        "trainer.limit_val_batches": 1, "model.init_args.net.init_args.channels": [8, 16],
        "model.init_args.recovery_steps": 3, "data.init_args.batch_size": 8, "data.init_args.batches_per_epoch": 2},
        callbacks={"SampleGrid": {"num_samples": 16}, "LastCheckpoint": {"every_n_train_steps": 2}})


def test_config_fits_through_the_cli_and_resumes_exactly(tmp_path):
    """``fit --config ebm_recovery_digits`` (tiny): 3 steps write last.ckpt and samples/final.png; then
    4 steps straight and 2 + resume + 2 end with bitwise equal parameters (spectral norm's vectors
    included), Adam moments and training generator."""
    def fit(run: Path, steps: int, *extra: str):
        config = _tiny_config(tmp_path / f"c{steps}.yaml", steps)
        run_cli("fit", "--config", str(config), f"--trainer.default_root_dir={run}", *extra, cwd=tmp_path)
        return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)

    three = fit(tmp_path / "three", 3)
    assert three["global_step"] == 3 and (tmp_path / "three" / "samples" / "final.png").stat().st_size > 0
    hparams = three["hyper_parameters"]
    assert hparams["objective"] == "recovery" and hparams["net"]["init_args"]["in_channels"] == 1
    straight = fit(tmp_path / "a", 4)
    fit(tmp_path / "b", 2)
    resumed = fit(tmp_path / "b", 4, f"--ckpt_path={tmp_path}/b/checkpoints/last.ckpt")
    assert straight["global_step"] == resumed["global_step"] == 4
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    for a, b in zip(straight["optimizer_states"][0]["state"].values(), resumed["optimizer_states"][0]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    (rng_a,), (rng_b,) = straight["ebm_replay_buffers"], resumed["ebm_replay_buffers"]
    assert torch.equal(rng_a["rng"], rng_b["rng"])
    assert any(not torch.equal(v, three["state_dict"][k]) for k, v in straight["state_dict"].items()
               if k.startswith("net."))  # it trained
