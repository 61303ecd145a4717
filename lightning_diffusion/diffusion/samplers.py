"""Samplers by name, each a function of (denoiser, Gaussian process, options).

Every sampler takes ``denoise_fn(x_t, t) -> x0_hat``, the model's estimate of the clean data at
time ``t`` (a float tensor [B] in the process's own time variable: the integer step index for a
DDPM, continuous t in (0, 1] for a score SDE), and a :class:`~lightning_diffusion.diffusion.sde.
GaussianProcess` with marginals ``x_t = alpha(t) x_0 + sigma(t) eps``. It needs nothing else: the
score is ``(alpha(t) x0_hat - x) / sigma(t)^2`` (Tweedie) and the reverse-time dynamics follow from
``alpha, sigma, f, g^2``. So one implementation serves DDPMs, VP/sub-VP/VE SDEs and any model
that can express itself as a denoiser; no sampler looks at the class of the process (only the
grid helpers ask whether its time is a DDPM's integer step).

Conventions shared by all samplers:

- ``steps`` is the sampler's step count (its meaning and the resulting NFE are in each
  docstring); None picks the paper's default.
- Time grids run from ``t_max`` (the prior) down to ``t_min``. A DDPM's net knows only integer
  steps, so on a :class:`~lightning_diffusion.diffusion.sde.DiscreteVP` every grid is rounded to
  integers (timestep respacing: ``steps`` evenly spaced integers from T-1 down to 0).
- ``clip`` clamps x0_hat to the data range at every evaluation ((-1, 1) for images; None for
  unbounded data).
- ``callback`` (k-diffusion's), if given, is called at every evaluation with
  ``{'x', 'i', 't', 'sigma', 'denoised'}`` (:data:`Callback`): how a trajectory is recorded.
- All samples of a batch share the time grid, so every coefficient is a float64 scalar computed
  from the process and applied to float32 data of any shape ([B, D] points, [B, C, H, W] images);
  per-sample norms flatten all data dimensions.
- Every sampler returns :class:`SamplerOutput` ``(x, nfe)``: ``x`` is, by custom, the final
  denoised estimate x0_hat at the last grid time, and ``nfe`` counts the ``denoise_fn`` calls.
"""

# No `from __future__ import annotations` here: the fields of the NamedTuples must be evaluated types,
# or the API reference (pdoc) cannot resolve them (it looks in the namedtuple's namespace).
import inspect
import math
from typing import Any, Callable, Literal, NamedTuple

import torch
from torch import Tensor

from lightning_diffusion.diffusion.sde import GaussianProcess
from lightning_diffusion.mcmc.kernels import Chains, Target, per_sample
from lightning_diffusion.errors import OptionError  # noqa: F401 - raised here, and importable from here as before
from lightning_diffusion import options
from lightning_diffusion.options import (Fraction, NonNegativeInt, Positive, PositiveInt, check_call, check_value,
                                        defaults_of)
from lightning_diffusion.sampling import SamplerOutput

Denoiser = Callable[[Tensor, Tensor], Tensor]
#: ``callback(step)``, called at every network evaluation of a sampler (k-diffusion's ``callback``):
#: ``step`` is ``{'x': x_t, 'i': evaluation index from 0, 't': time, 'sigma': noise level sigma/alpha,
#: 'denoised': x0_hat}`` (tensors as the sampler holds them: clone what you keep)
Callback = Callable[[dict], None]
AncestralVariance = Literal["fixedsmall", "fixedlarge"]
Predictor = Literal["reverse_diffusion", "euler_maruyama"]
DPMGrid = Literal["logsnr", "time"]
SolverOrder = Literal[1, 2, 3]
UniPCVariant = Literal["bh1", "bh2"]
#: ``energy_fn(x_t, t) -> E [B]``: the energy of the noised marginal, ``E = -log p_t(x_t)`` up to a
#: constant (nats), at the process's time ``t`` (a [B] tensor, as the denoiser gets it)
EnergyFn = Callable[[Tensor, Tensor], Tensor]
#: the MCMC move of :func:`annealed_mcmc`: unadjusted Langevin, Metropolis-adjusted Langevin, or HMC
MCMCKernel = Literal["ula", "mala", "hmc"]
#: the acceptance rate :func:`annealed_mcmc` adapts its step to by default: MALA's optimum 0.574
#: (Roberts & Rosenthal 1998) and HMC's 0.65 (Neal 2011, sec. 4.4; Beskos et al. 2013: 0.651);
#: ULA accepts every move and has nothing to adapt on
TARGET_ACCEPTANCE: dict[str, float] = {"mala": 0.57, "hmc": 0.65}
#: the Robbins-Monro gain of the step adaptation: log step_scale += ADAPT_GAIN * (acceptance - target)
#: after each move (acceptance 1 at the target 0.57 grows the step by e^0.43 = 1.5x a move)
ADAPT_GAIN = 1.0
LOWER_ORDER_FINAL_BELOW = 10  # DPM-Solver's reference code: lower orders in the last steps only below 10 steps


# -- shared helpers ---------------------------------------------------------------------------
def _at(fn: Callable[[Tensor], Tensor], t: float) -> float:
    """A process coefficient (alpha, sigma, f, g2, ratio) at one time, computed in float64."""
    return float(fn(torch.tensor([t], dtype=torch.float64))[0])


class CountedDenoiser:
    """``denoise_fn`` with the samplers' conventions, counting its calls in ``nfe``.

    ``self(x, t)`` takes one time ``t`` (float) for the whole batch, passes it as a [B] tensor in
    x's dtype, returns x0_hat in x's dtype, clamped to ``clip``; ``score(x, t)`` is
    ``(alpha x0_hat - x) / sigma^2``; ``callback`` (:data:`Callback`) sees every evaluation.
    """

    def __init__(self, denoise_fn: Denoiser, process: GaussianProcess, clip: tuple[float, float] | None,
                 callback: Callback | None = None):
        self.denoise_fn, self.process, self.clip, self.callback, self.nfe = denoise_fn, process, clip, callback, 0

    def __call__(self, x: Tensor, t: float) -> Tensor:
        self.nfe += 1
        x0 = self.denoise_fn(x, torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)).to(x.dtype)
        x0 = x0 if self.clip is None else x0.clamp(*self.clip)
        if self.callback is not None:
            self.callback({"x": x, "i": self.nfe - 1, "t": float(t), "sigma": _at(self.process.ratio, float(t)),
                           "denoised": x0})
        return x0

    def score(self, x: Tensor, t: float) -> Tensor:
        alpha, sigma = _at(self.process.alpha, t), _at(self.process.sigma, t)
        return (alpha * self(x, t) - x) / sigma**2


class Transition(NamedTuple):
    """Coefficients between grid times s < t (float64): ``q(x_t | x_s) = N(a x_s, v I)`` with
    ``a = alpha_t / alpha_s``, ``v = sigma_t^2 - a^2 sigma_s^2``; the posterior
    ``q(x_s | x_t, x_0)`` has variance ``posterior_var = sigma_s^2 v / sigma_t^2``."""

    alpha_t: float
    sigma_t: float
    alpha_s: float
    sigma_s: float
    a: float
    v: float
    posterior_var: float


def transition(process: GaussianProcess, t: float, s: float) -> Transition:
    alpha_t, sigma_t = _at(process.alpha, t), _at(process.sigma, t)
    alpha_s, sigma_s = _at(process.alpha, s), _at(process.sigma, s)
    a = alpha_t / alpha_s
    v = max(sigma_t**2 - a**2 * sigma_s**2, 0.0)
    return Transition(alpha_t, sigma_t, alpha_s, sigma_s, a, v, sigma_s**2 * v / sigma_t**2)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_steps(steps: int | None, default: int, least: int, most: int | None = None, what: str = "") -> int:
    """``steps`` (or ``default`` when None), checked to be an integer in ``[least, most]`` (else an
    :class:`OptionError`); ``what`` says where ``most`` comes from. The one rule of every step count."""
    value = default if steps is None else steps
    if _is_int(value) and value >= least and (most is None or value <= most):
        return value
    allowed = f"an integer >= {least}" if most is None else f"an integer in [{least}, {most}]"
    problem = f"steps must be {allowed}{what}" if steps is not None else \
        f"the default of {default} steps is out of range{what}: steps must be {allowed}"
    advice = (f"give steps <= {most}" if _is_int(value) and most is not None and value > most
              else f"give an integer steps >= {least}")
    raise OptionError("steps", steps, problem, advice)


def _step_limit(process: GaussianProcess, extra: int = 0) -> tuple[int | None, str]:
    """The most grid points ``- extra`` a time grid can have: a DDPM's T (its integer steps), else no limit."""
    if not process.discrete:
        return None, ""
    timesteps = int(process.t_max) + 1
    return timesteps - extra, f" (a DDPM of {timesteps} timesteps has at most {timesteps} grid points)"


def time_grid(process: GaussianProcess, num: int) -> list[float]:
    """``num`` times uniform from ``t_max`` down to ``t_min`` (Song et al. 2021's grid); on a DDPM
    ``num`` evenly spaced integer steps from T-1 to 0, both included (timestep respacing)."""
    most, what = _step_limit(process)
    check_steps(num, num, 2, most, what)
    grid = torch.linspace(process.t_max, process.t_min, num, dtype=torch.float64)
    if process.discrete:
        grid = grid.round()
    return grid.tolist()


def _times_of_ratios(process: GaussianProcess, ratios: Tensor, t_end: float | None = None) -> list[float]:
    """Times of the noise levels ``sigma/alpha`` [N] (decreasing, from ratio(t_max) to ratio(t_end)),
    endpoints pinned to t_max and ``t_end`` (None: t_min); on a DDPM rounded to integer steps without
    repeats (EDM's ``round_sigma``)."""
    t = process.t_of_ratio(ratios.to(torch.float64))
    t[0], t[-1] = process.t_max, process.t_min if t_end is None else t_end
    return torch.unique_consecutive(_snap(process, t)).tolist()


def _snap(process: GaussianProcess, t: Tensor) -> Tensor:
    """Times a DDPM's net knows: integer steps (EDM's ``round_sigma``); continuous times unchanged."""
    return t.round() if process.discrete else t


def karras_grid(process: GaussianProcess, num: int, rho: float = 7.0, sigma_max: float | None = None,
                sigma_min: float | None = None) -> list[float]:
    """Times of EDM's noise levels (Karras et al. 2022, eq. 5):
    ``sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho``, i = 0..N-1, with
    ``smax = sigma_max`` and ``smin = sigma_min`` in units of ``sigma/alpha``, clamped to the
    process's range ``[ratio(t_min), ratio(t_max)]`` (None: the ends of that range)."""
    check_steps(num, num, 2)
    top, bottom = _at(process.ratio, process.t_max), _at(process.ratio, process.t_min)
    smax = top if sigma_max is None else min(max(sigma_max, bottom), top)
    smin = bottom if sigma_min is None else min(max(sigma_min, bottom), smax)
    i = torch.arange(num, dtype=torch.float64) / (num - 1)
    ratios = (smax ** (1 / rho) + i * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    t = process.t_of_ratio(ratios)
    if sigma_max is None:
        t[0] = process.t_max
    if sigma_min is None:
        t[-1] = process.t_min
    return torch.unique_consecutive(_snap(process, t.clamp(process.t_min, process.t_max))).tolist()


def end_time(process: GaussianProcess, sigma_min: float | None) -> float:
    """The time where a solver's grid ends: where ``sigma/alpha = sigma_min`` (clamped to the
    process's range; on a DDPM the nearest integer step), or t_min for None. Raises
    :class:`OptionError` unless sigma_min is None or positive."""
    if sigma_min is None:
        return process.t_min
    if not sigma_min > 0:
        raise OptionError("sigma_min", sigma_min, "must be a positive noise level sigma/alpha, or None for the process's t_min")
    t = process.t_of_ratio(torch.tensor([sigma_min], dtype=torch.float64)).clamp(process.t_min, process.t_max)
    return float(_snap(process, t)[0])


def logsnr_grid(process: GaussianProcess, num: int, sigma_min: float | None = None) -> list[float]:
    """``num`` times uniform in ``lambda = log(alpha/sigma)`` from t_max down to t_min, or to the
    time of the noise level ``sigma_min`` (units of sigma/alpha) if given (Lu et al. 2022)."""
    check_steps(num, num, 2)
    t_end = end_time(process, sigma_min)
    lam_max, lam_min = -math.log(_at(process.ratio, t_end)), -math.log(_at(process.ratio, process.t_max))
    return _times_of_ratios(process, torch.exp(-torch.linspace(lam_min, lam_max, num, dtype=torch.float64)), t_end)


def solver_grid(process: GaussianProcess, num: int, grid: str = "logsnr", sigma_min: float | None = None) -> list[float]:
    """The ``num`` times of dpm_solver and unipc: uniform in logSNR (``logsnr``, Lu et al. 2022's choice
    for low-resolution data) or in time (``time``, their choice for high resolution), from t_max to the
    time of ``sigma_min`` (None: t_min); on a DDPM rounded to integer steps without repeats."""
    if grid == "logsnr":
        return logsnr_grid(process, num, sigma_min)
    if sigma_min is None:
        return time_grid(process, num)
    check_steps(num, num, 2)
    t = torch.linspace(process.t_max, end_time(process, sigma_min), num, dtype=torch.float64)
    return torch.unique_consecutive(_snap(process, t)).tolist()


def sampler_grid(name: str, process: GaussianProcess, steps: int | None = None, **options: Any) -> list[float]:
    """The time grid that sampler ``name`` runs on ``process`` with ``steps`` (None: its entry's
    default in :data:`SAMPLERS`) and its grid ``options`` (heun's ``rho``, ``sigma_max``, ``sigma_min``;
    dpm_solver's and unipc's ``grid`` and ``sigma_min``; the rest of the sampler's defaults fill in):
    the samplers take their grids from here, and :func:`check_options` checks a step count by building
    the grid, so each sampler's step rule is written once. An adaptive sampler (``ode``) has no grid
    and takes no ``steps``. Raises :class:`OptionError` for an unknown sampler or a step count the
    grid cannot have (fewer than 2 points; more than the T integer steps of a DDPM)."""
    entry = registered(name)
    return entry.grid(process, steps, entry.default_steps(process), {**defaults_of(entry.run), **options})


def uniform_grid(process: GaussianProcess, steps: int | None, default: int | None, options: dict[str, Any]) -> list[float]:
    """Grid rule of ancestral, ddim, euler_maruyama and pc: ``steps`` (None: ``default``) times uniform
    in t (:func:`time_grid`), 2 to T of them on a DDPM."""
    return time_grid(process, check_steps(steps, default, 2, *_step_limit(process)))


def _karras_steps(process: GaussianProcess, steps: int | None, default: int | None, options: dict[str, Any]) -> list[float]:
    """Grid rule of heun: EDM's noise levels (:func:`karras_grid`) with its ``rho``, ``sigma_max``, ``sigma_min``."""
    return karras_grid(process, check_steps(steps, default, 2), options["rho"], options["sigma_max"], options["sigma_min"])


def _solver_steps(process: GaussianProcess, steps: int | None, default: int | None, options: dict[str, Any]) -> list[float]:
    """Grid rule of dpm_solver and unipc: M solver steps, M + 1 times of :func:`solver_grid`."""
    most, what = _step_limit(process, extra=1) if options["grid"] == "time" else (None, "")
    num = check_steps(steps, default, 1, most, what) + 1
    return solver_grid(process, num, options["grid"], options["sigma_min"])


def _adaptive(process: GaussianProcess, steps: int | None, default: int | None, options: dict[str, Any]) -> list[float]:
    """Grid rule of an adaptive solver: none, and no ``steps``."""
    if steps is not None:
        raise OptionError("steps", steps, "the ode sampler is adaptive and takes no steps",
                          "leave steps out and set rtol/atol, or choose a fixed-step sampler (ddim, heun, dpm_solver)")
    return []


def _noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _prior(process: GaussianProcess, shape: tuple[int, ...], generator, device) -> Tensor:
    return process.prior_sampling(tuple(shape), generator=generator, device=device)


# -- one-step updates shared by euler_maruyama and pc -----------------------------------------
def euler_maruyama_step(process: GaussianProcess, den: CountedDenoiser, x: Tensor, t: float, s: float,
                        noise: Tensor | None) -> Tensor:
    """Reverse SDE (Song et al. 2021, eq. 6) from t to s < t:
    ``x_s = x_t - [f(t) x_t - g(t)^2 score] (t - s) + g(t) sqrt(t - s) z``."""
    f, g2 = _at(process.f, t), _at(process.g2, t)
    x = x - (f * x - g2 * den.score(x, t)) * (t - s)
    return x if noise is None else x + math.sqrt(g2 * (t - s)) * noise


def reverse_diffusion_step(process: GaussianProcess, den: CountedDenoiser, x: Tensor, t: float, s: float,
                           noise: Tensor | None) -> Tensor:
    """score_sde's reverse-diffusion predictor (Song et al. 2021, eq. 46) for the forward step
    ``x_t = a x_s + sqrt(v) z``: ``x_s = (2 - a) x_t + v score + sqrt(v) z`` (VE: ``a = 1``,
    ``v = sigma_t^2 - sigma_s^2``; DDPM: ``a = sqrt(1 - beta)``, ``v = beta``)."""
    step = transition(process, t, s)
    x = (2 - step.a) * x + step.v * den.score(x, t)
    return x if noise is None else x + math.sqrt(step.v) * noise


def langevin_step(den: CountedDenoiser, x: Tensor, t: float, snr: float, a2: float,
                  generator: torch.Generator | None) -> Tensor:
    """Langevin corrector (Song et al. 2021, Algorithm 5): ``x <- x + e score + sqrt(2 e) z`` with
    step ``e = 2 a2 (snr ||z|| / ||score||)^2`` (``a2 = 1`` for VE, ``1 - beta`` for VP).

    As in score_sde's code, ``||z||`` and ``||score||`` are per-sample norms averaged over the
    batch: a per-sample ratio is heavy-tailed in low dimension (a sample at a mode's centre has
    score ~ 0 and would take an enormous step).
    """
    score, z = den.score(x, t), _noise(x, generator)
    ratio = snr * z.flatten(1).norm(dim=1).mean() / score.flatten(1).norm(dim=1).mean().clamp_min(1e-12)
    step = 2 * a2 * ratio**2
    return x + step * score + (2 * step).sqrt() * z


def ancestral_step(process: GaussianProcess, x: Tensor, x0: Tensor, t: float, s: float, variance: str,
                   generator: torch.Generator | None) -> Tensor:
    """One step of :func:`ancestral` from t to s < t given x0_hat: ``x_s = mu~(x_t, x0_hat) + sqrt(var) z``
    (``fixedsmall``: the posterior variance; ``fixedlarge``: the transition's ``v``)."""
    step = transition(process, t, s)
    mean = (step.a * step.sigma_s**2 / step.sigma_t**2) * x + (step.alpha_s * step.v / step.sigma_t**2) * x0
    var = step.posterior_var if variance == "fixedsmall" else step.v
    return mean + math.sqrt(var) * _noise(x, generator)


# -- the samplers -----------------------------------------------------------------------------
@torch.no_grad()
def ancestral(denoise_fn: Denoiser, process: GaussianProcess, shape: tuple[int, ...], *, steps: int | None = None,
              generator: torch.Generator | None = None, device: torch.device | str = "cpu",
              clip: tuple[float, float] | None = None,
              callback: Callback | None = None, variance: AncestralVariance = "fixedsmall") -> SamplerOutput:
    """Ancestral sampling through the posterior (Ho et al. 2020, Algorithm 2 and eq. 7), on any grid.

    For grid times s < t: ``x_s = mu~(x_t, x0_hat) + sqrt(var) z`` with the posterior mean
    ``mu~ = (a sigma_s^2 / sigma_t^2) x_t + (alpha_s v / sigma_t^2) x0_hat`` (``a, v`` of
    :class:`Transition`) and ``var`` the posterior variance ``sigma_s^2 v / sigma_t^2`` (``fixedsmall``,
    beta-tilde) or the transition variance ``v`` (``fixedlarge``, beta_t on a full DDPM grid). At the
    last grid time (step 0 for a DDPM) it returns x0_hat without noise, which is Ho et al.'s mean.

    ``steps``: grid points (default: all T steps of a DDPM, 1000 otherwise); NFE = steps.
    """
    check_value("variance", variance, AncestralVariance)
    den = CountedDenoiser(denoise_fn, process, clip, callback)
    grid = sampler_grid("ancestral", process, steps)
    x = _prior(process, shape, generator, device)
    for t, s in zip(grid[:-1], grid[1:]):
        x = ancestral_step(process, x, den(x, t), t, s, variance, generator)
    return SamplerOutput(den(x, grid[-1]), den.nfe)


@torch.no_grad()
def ddim(denoise_fn: Denoiser, process: GaussianProcess, shape: tuple[int, ...], *, steps: int | None = None,
         generator: torch.Generator | None = None, device: torch.device | str = "cpu",
         clip: tuple[float, float] | None = None, callback: Callback | None = None,
         eta: float = 0.0) -> SamplerOutput:
    """DDIM (Song, Meng & Ermon 2021, eq. 12), written for any alpha, sigma:

    ``x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z``, ``eps_hat = (x_t - alpha_t x0_hat) / sigma_t``,
    ``c = eta sqrt(sigma_s^2 v / sigma_t^2)`` (eq. 16); ``eta = 0`` (default) is deterministic, ``eta = 1``
    is ancestral sampling with the posterior variance.

    ``steps``: grid points (default 50); NFE = steps.
    """
    den = CountedDenoiser(denoise_fn, process, clip, callback)
    grid = sampler_grid("ddim", process, steps)
    x = _prior(process, shape, generator, device)
    for t, s in zip(grid[:-1], grid[1:]):
        step = transition(process, t, s)
        x0 = den(x, t)
        eps = (x - step.alpha_t * x0) / step.sigma_t
        c2 = eta**2 * step.posterior_var
        x = step.alpha_s * x0 + math.sqrt(max(step.sigma_s**2 - c2, 0.0)) * eps
        if eta > 0:
            x = x + math.sqrt(c2) * _noise(x, generator)
    return SamplerOutput(den(x, grid[-1]), den.nfe)


@torch.no_grad()
def euler_maruyama(denoise_fn: Denoiser, process: GaussianProcess, shape: tuple[int, ...], *,
                   steps: int | None = None, generator: torch.Generator | None = None,
                   device: torch.device | str = "cpu", clip: tuple[float, float] | None = None,
                   callback: Callback | None = None) -> SamplerOutput:
    """Euler-Maruyama on the reverse SDE (Song et al. 2021, eq. 6):
    ``dx = [f(t) x - g(t)^2 score(x, t)] dt + g(t) dW-bar``, t from t_max to t_min; the last step
    adds no noise, then x0_hat is returned.

    ``steps``: grid points (default 1000, as in the paper); NFE = steps.
    """
    den = CountedDenoiser(denoise_fn, process, clip, callback)
    grid = sampler_grid("euler_maruyama", process, steps)
    x = _prior(process, shape, generator, device)
    for i, (t, s) in enumerate(zip(grid[:-1], grid[1:])):
        x = euler_maruyama_step(process, den, x, t, s, None if i == len(grid) - 2 else _noise(x, generator))
    return SamplerOutput(den(x, grid[-1]), den.nfe)


@torch.no_grad()
def pc(denoise_fn: Denoiser, process: GaussianProcess, shape: tuple[int, ...], *, steps: int | None = None,
       generator: torch.Generator | None = None, device: torch.device | str = "cpu",
       clip: tuple[float, float] | None = None,
       callback: Callback | None = None, snr: float = 0.16, corrector_steps: int = 1,
       predictor: Predictor = "reverse_diffusion") -> SamplerOutput:
    """Predictor-corrector sampling (Song et al. 2021, Algorithms 2-3 and 5).

    At each grid time t but the last: ``corrector_steps`` Langevin steps at t with signal-to-noise
    ratio ``snr`` (:func:`langevin_step`, ``a2 = (alpha_t / alpha_s)^2`` of the coming step), then a
    predictor step to the next time s: ``reverse_diffusion`` (:func:`reverse_diffusion_step`,
    default) or ``euler_maruyama``. The last predictor step adds no noise; x0_hat is returned.

    Defaults are the paper's: ``snr = 0.16``, one corrector step. ``steps``: grid points (default
    1000); NFE = (steps - 1) (corrector_steps + 1) + 1.
    """
    check_value("predictor", predictor, Predictor)
    predict = reverse_diffusion_step if predictor == "reverse_diffusion" else euler_maruyama_step
    den = CountedDenoiser(denoise_fn, process, clip, callback)
    grid = sampler_grid("pc", process, steps)
    x = _prior(process, shape, generator, device)
    for i, (t, s) in enumerate(zip(grid[:-1], grid[1:])):
        a2 = transition(process, t, s).a ** 2
        for _ in range(corrector_steps):
            x = langevin_step(den, x, t, snr, a2, generator)
        x = predict(process, den, x, t, s, None if i == len(grid) - 2 else _noise(x, generator))
    return SamplerOutput(den(x, grid[-1]), den.nfe)


@torch.no_grad()
def ode(denoise_fn: Denoiser, process: GaussianProcess, shape: tuple[int, ...], *, steps: int | None = None,
        generator: torch.Generator | None = None, device: torch.device | str = "cpu",
        clip: tuple[float, float] | None = None,
        callback: Callback | None = None, method: str = "dopri5", rtol: float = 1e-5,
        atol: float = 1e-5) -> SamplerOutput:
    """Probability-flow ODE (Song et al. 2021, eq. 13): ``dx/dt = f(t) x - g(t)^2 / 2 score(x, t)``,
    integrated from t_max to t_min by ``torchdiffeq.odeint`` (adaptive ``method``, default
    ``dopri5`` (RK45), ``rtol = atol = 1e-5`` as in the paper); returns x0_hat at t_min.

    Adaptive: ``steps`` must stay None. NFE = the solver's evaluations + 1 (the final x0_hat).
    """
    from torchdiffeq import odeint

    sampler_grid("ode", process, steps)  # refuses steps
    den = CountedDenoiser(denoise_fn, process, clip, callback)

    def drift(t: Tensor, x: Tensor) -> Tensor:
        t = min(max(float(t), process.t_min), process.t_max)  # the first-step heuristic may probe outside
        return _at(process.f, t) * x - 0.5 * _at(process.g2, t) * den.score(x, t)

    x = _prior(process, shape, generator, device)
    times = torch.tensor([process.t_max, process.t_min], dtype=torch.float64, device=x.device)
    options = {"step_t": times} if method in ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun") else None
    x = odeint(drift, x, times, rtol=rtol, atol=atol, method=method, options=options)[-1]  # step_t: land on t_min
    return SamplerOutput(den(x, process.t_min), den.nfe)


@torch.no_grad()
def heun(denoise_fn: Denoiser, process: GaussianProcess, shape: tuple[int, ...], *, steps: int | None = None,
         generator: torch.Generator | None = None, device: torch.device | str = "cpu",
         clip: tuple[float, float] | None = None,
         callback: Callback | None = None, rho: float = 7.0, sigma_max: float | None = None,
         sigma_min: float | None = None, S_churn: float = 0.0, S_tmin: float = 0.0,
         S_tmax: float = float("inf"), S_noise: float = 1.0) -> SamplerOutput:
    """EDM's stochastic Heun sampler (Karras et al. 2022, Algorithm 2), on ``x~ = x / alpha(t)``.

    In EDM's variables ``x~`` and ``sigma~ = sigma(t) / alpha(t)`` every process is the VE ODE
    ``dx~/dsigma~ = (x~ - D(x~, sigma~)) / sigma~`` with ``D(x~, sigma~) = denoise_fn(alpha(t) x~, t)``,
    ``t = t_of_ratio(sigma~)``. On the :func:`karras_grid` sigma_0 > .. > sigma_{N-1}, sigma_N = 0:
    churn ``gamma_i = min(S_churn / N, sqrt(2) - 1)`` where ``S_tmin <= sigma_i <= S_tmax``,
    ``sigma^ = (1 + gamma_i) sigma_i`` (capped at ratio(t_max)), ``x^ = x~ + sqrt(sigma^^2 - sigma_i^2) S_noise z``;
    an Euler step to sigma_{i+1} and its trapezoidal (Heun) correction; the last step is Euler to
    sigma = 0, i.e. it returns D. Starts from ``x~ = x_T / alpha(t_max)``.

    Defaults are the paper's: ``rho = 7``, deterministic (``S_churn = 0, S_tmin = 0,
    S_tmax = inf, S_noise = 1``). ``steps`` = N (default 18); NFE = 2 N - 1 (on a DDPM, levels
    that round to the same integer step are merged first).
    """
    den = CountedDenoiser(denoise_fn, process, clip, callback)
    times = sampler_grid("heun", process, steps, rho=rho, sigma_max=sigma_max, sigma_min=sigma_min)
    sigmas = [_at(process.ratio, t) for t in times]
    n = len(sigmas)

    def denoise(x_tilde: Tensor, t: float) -> Tensor:
        return den(_at(process.alpha, t) * x_tilde, t)

    def churn(x: Tensor, i: int) -> tuple[Tensor, float, float]:
        """Raise the noise of level i by gamma_i: (x^, t^, sigma^)."""
        gamma = min(S_churn / n, math.sqrt(2) - 1) if S_tmin <= sigmas[i] <= S_tmax else 0.0
        if gamma == 0:
            return x, times[i], sigmas[i]
        t_hat = process.t_of_ratio(torch.tensor([(1 + gamma) * sigmas[i]], dtype=torch.float64)).clamp(max=process.t_max)
        t_hat = float(_snap(process, t_hat)[0])
        sigma_hat = _at(process.ratio, t_hat)
        return x + math.sqrt(max(sigma_hat**2 - sigmas[i] ** 2, 0.0)) * S_noise * _noise(x, generator), t_hat, sigma_hat

    if times[0] < process.t_max:  # EDM: x~ ~ N(0, sigma_0^2), the data negligible beside it
        x = sigmas[0] * torch.randn(tuple(shape), generator=generator, device=device)
    else:
        x = _prior(process, shape, generator, device) / _at(process.alpha, process.t_max)
    for i in range(n - 1):
        x, t_hat, sigma_hat = churn(x, i)
        d = (x - denoise(x, t_hat)) / sigma_hat
        x_next = x + (sigmas[i + 1] - sigma_hat) * d
        d_next = (x_next - denoise(x_next, times[i + 1])) / sigmas[i + 1]
        x = x + (sigmas[i + 1] - sigma_hat) * 0.5 * (d + d_next)
    x, t_hat, _ = churn(x, n - 1)
    return SamplerOutput(denoise(x, t_hat), den.nfe)  # the Euler step to sigma = 0 lands on D


class _LogSNRGrid(NamedTuple):
    """A solver grid's times with alpha, sigma and ``lambda = log(alpha / sigma)`` at each (float64)."""

    times: list[float]
    alphas: list[float]
    sigmas: list[float]
    lambdas: list[float]


def _log_snr_grid(process: GaussianProcess, times: list[float]) -> _LogSNRGrid:
    alphas = [_at(process.alpha, t) for t in times]
    sigmas = [_at(process.sigma, t) for t in times]
    return _LogSNRGrid(times, alphas, sigmas, [math.log(a / s) for a, s in zip(alphas, sigmas)])


def _step_order(order: int, known: int, i: int, steps: int, lower_order_final: bool) -> int:
    """The order of multistep step i (1-based) of ``steps``: at most ``order``, at most the ``known``
    x0_hat values (lower orders first, Lu et al. 2022), and, with ``lower_order_final`` and fewer than
    10 steps, at most the steps left (``steps + 1 - i``, DPM-Solver's reference code)."""
    k = min(order, known)
    if lower_order_final and steps < LOWER_ORDER_FINAL_BELOW:
        k = min(k, steps + 1 - i)
    return k


def _dpmpp_step(x: Tensor, history: list[tuple[float, Tensor]], order: int, g: _LogSNRGrid, i: int) -> Tensor:
    """One multistep DPM-Solver++ step of ``order`` from grid time i-1 to i (Lu et al. 2022, Algorithm 2
    and its third-order multistep update), with ``history`` the (lambda, x0_hat) pairs, newest last.

    ``h = lambda_i - lambda_{i-1}``, ``phi_1 = e^{-h} - 1``, ``phi_2 = phi_1 / h + 1``,
    ``phi_3 = phi_2 / h - 1/2``; with ``r_0 = h_{i-1} / h``, ``r_1 = h_{i-2} / h`` and the divided
    differences ``D1_0 = (m_0 - m_1) / r_0``, ``D1_1 = (m_1 - m_2) / r_1`` of x0_hat m_0, m_1, m_2 (newest first):
    order 1 ``x_i = (sigma_i / sigma_{i-1}) x - alpha_i phi_1 m_0`` (DDIM); order 2 adds
    ``- alpha_i phi_1 D1_0 / 2``; order 3 adds ``alpha_i phi_2 D1 - 2 alpha_i phi_3 D2`` with
    ``D1 = D1_0 + r_0 / (r_0 + r_1) (D1_0 - D1_1)`` (~ h x0_hat') and
    ``D2 = (D1_0 - D1_1) / (r_0 + r_1)`` (~ h^2 x0_hat'' / 2). The exact integral of the Taylor
    expansion has ``-alpha_i phi_3 h^2 x0_hat''``, hence the 2: the reference code's
    ``- alpha_i phi_3 D2`` halves that term and converges with order 2 only
    (tests/test_samplers.py measures both orders).
    """
    lam_0, m_0 = history[-1]
    h = g.lambdas[i] - lam_0
    phi_1 = math.expm1(-h)
    x = (g.sigmas[i] / g.sigmas[i - 1]) * x - (g.alphas[i] * phi_1) * m_0
    if order == 1:
        return x
    lam_1, m_1 = history[-2]
    r_0 = (lam_0 - lam_1) / h
    d1_0 = (m_0 - m_1) / r_0
    if order == 2:
        return x - (0.5 * g.alphas[i] * phi_1) * d1_0
    lam_2, m_2 = history[-3]
    r_1 = (lam_1 - lam_2) / h
    d1_1 = (m_1 - m_2) / r_1
    d1 = d1_0 + (r_0 / (r_0 + r_1)) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r_0 + r_1)
    phi_2 = phi_1 / h + 1
    phi_3 = phi_2 / h - 0.5
    return x + (g.alphas[i] * phi_2) * d1 - (2 * g.alphas[i] * phi_3) * d2


def _newest(history: list, n: int) -> list:
    """The newest ``n`` entries of ``history`` (all of them if fewer; none for n = 0)."""
    return history[max(len(history) - n, 0):]


def _check_solver(order: int, grid: str) -> None:
    check_value("order", order, SolverOrder)
    check_value("grid", grid, DPMGrid)


@torch.no_grad()
def dpm_solver(denoise_fn: Denoiser, process: GaussianProcess, shape: tuple[int, ...], *,
               steps: int | None = None, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu", clip: tuple[float, float] | None = None,
               callback: Callback | None = None,
               grid: DPMGrid = "logsnr", denoise_to_zero: bool = False, order: SolverOrder = 2,
               lower_order_final: bool = True, sigma_min: float | None = None) -> SamplerOutput:
    """Multistep DPM-Solver++ in x0-prediction (Lu et al. 2022, "DPM-Solver++", Algorithm 2 for
    ``order = 2``, the default: DPM-Solver++(2M); ``order = 3``: DPM-Solver++(3M), the third-order
    multistep update of their reference code; ``order = 1``: DDIM).

    With ``lambda = log(alpha / sigma)``, ``h_i = lambda_i - lambda_{i-1}``, ``r_i = h_{i-1} / h_i``,
    order 2 is ``x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (e^{-h_i} - 1) D_i`` with
    ``D_i = (1 + 1 / (2 r_i)) x0_hat_{i-1} - 1 / (2 r_i) x0_hat_{i-2}``; the third-order update is in
    :func:`_dpmpp_step`. The first steps have lower orders (1, then 2), for want of earlier x0_hat.

    Options (the paper's defaults):

    - ``grid``: ``logsnr`` (uniform in lambda, the paper's choice for low-resolution data) or ``time``.
    - ``order``: 1, 2 (default) or 3.
    - ``lower_order_final`` (True): with fewer than 10 steps, the last steps drop to the orders
      left (order 3: ..., 2, 1), the reference code's stabiliser for very few steps.
    - ``sigma_min``: the noise level ``sigma/alpha`` where the grid ends (None: the process's t_min,
      sigma/alpha = 0.001 on the VP SDE). The reference code ends at t = 1/N, i.e. 0.01 (t = 1e-3
      on the VP SDE, a DDPM's step 0); Lu et al. recommend it for <= 15 steps.
    - ``denoise_to_zero`` (False): True returns x0_hat at the last time instead of x (one more NFE).

    ``steps`` = M solver steps (default 20), M + 1 grid times; NFE = M (+ 1 with ``denoise_to_zero``;
    on a DDPM, logSNR times that round to the same integer step are merged first).
    """
    _check_solver(order, grid)
    den = CountedDenoiser(denoise_fn, process, clip, callback)
    g = _log_snr_grid(process, sampler_grid("dpm_solver", process, steps, grid=grid, sigma_min=sigma_min))
    m = len(g.times) - 1
    x = _prior(process, shape, generator, device)
    history: list[tuple[float, Tensor]] = []
    for i in range(1, m + 1):
        history = [*_newest(history, order - 1), (g.lambdas[i - 1], den(x, g.times[i - 1]))]
        x = _dpmpp_step(x, history, _step_order(order, len(history), i, m, lower_order_final), g, i)
    if denoise_to_zero:
        x = den(x, g.times[-1])
    return SamplerOutput(x, den.nfe)


def _unipc_step(x: Tensor, history: list[tuple[float, Tensor]], order: int, g: _LogSNRGrid, i: int,
                variant: str, x0_new: Tensor | None = None) -> Tensor:
    """UniPC's update from grid time i-1 to i (Zhao et al. 2023, Algorithms 1-2, the B(h) form in
    x0-prediction), with ``history`` the (lambda, x0_hat) pairs, newest last.

    With ``h = lambda_i - lambda_{i-1}``, ``r_k = (lambda_{i-1-k} - lambda_{i-1}) / h`` and
    ``D_k = (m_k - m_0) / r_k`` for the k = 1 .. order-1 earlier x0_hat m_k:
    ``x_i = (sigma_i / sigma_{i-1}) x - alpha_i (e^{-h} - 1) m_0 - alpha_i B(h) sum_k rho_k D_k``
    with ``B(h) = -h`` (bh1) or ``e^{-h} - 1`` (bh2). The predictor UniP (``x0_new`` None) solves
    ``R rho = b`` on the earlier points (order 2: rho = 1/2); the corrector UniC adds
    ``D_new = x0_new - m_0`` at ``r = 1`` (x0_new: x0_hat at the predicted x_i) and solves the full
    system (order 1: rho = 1/2), one order more accurate. ``R_jk = r_k^(j-1)``,
    ``b_j = (j-1)! h phi_{j+1}(-h) / B(h)`` (``phi_{k+1}(z) = (phi_k(z) - 1/k!) / z``).
    """
    lam_0, m_0 = history[-1]
    h = g.lambdas[i] - lam_0
    hh = -h  # x0-prediction integrates in -lambda
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else h_phi_1
    rks = [(history[-1 - k][0] - lam_0) / h for k in range(1, order)]
    diffs = [(history[-1 - k][1] - m_0) / r for k, r in zip(range(1, order), rks)]
    x_base = (g.sigmas[i] / g.sigmas[i - 1]) * x - (g.alphas[i] * h_phi_1) * m_0
    corrector = x0_new is not None
    if corrector:
        rks, diffs = [*rks, 1.0], [*diffs, x0_new - m_0]
    if not diffs:
        return x_base
    n = len(rks)
    if n == 1:
        rhos = [0.5]  # UniP-2 and UniC-1: the reference code's closed form
    else:
        b, h_phi_k, factorial = [], h_phi_1 / hh - 1, 1
        for j in range(1, n + 1):
            b.append(h_phi_k * factorial / b_h)
            factorial *= j + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        matrix = torch.tensor([[r ** (j - 1) for r in rks] for j in range(1, n + 1)], dtype=torch.float64)
        rhos = torch.linalg.solve(matrix, torch.tensor(b, dtype=torch.float64)).tolist()
    return x_base - (g.alphas[i] * b_h) * sum(rho * d for rho, d in zip(rhos, diffs))


@torch.no_grad()
def unipc(denoise_fn: Denoiser, process: GaussianProcess, shape: tuple[int, ...], *,
          steps: int | None = None, generator: torch.Generator | None = None,
          device: torch.device | str = "cpu", clip: tuple[float, float] | None = None,
          callback: Callback | None = None,
          order: SolverOrder = 2, variant: UniPCVariant = "bh2", grid: DPMGrid = "logsnr",
          sigma_min: float | None = 0.01, lower_order_final: bool = True,
          denoise_to_zero: bool = False) -> SamplerOutput:
    """UniPC, the unified predictor-corrector multistep solver (Zhao et al. 2023), in x0-prediction.

    Each step predicts x_i with UniP-``order`` from the last ``order`` x0_hat (:func:`_unipc_step`),
    evaluates x0_hat there, and corrects x_i with UniC, which uses that evaluation too and raises the
    order of accuracy by one (UniPC-2 is third order); the evaluation is reused by the next
    prediction, so the corrector costs no NFE. The last step is not corrected. The first steps have
    lower orders, for want of earlier x0_hat.

    Options (the reference code's defaults unless said):

    - ``order``: 1, 2 (default) or 3, UniP's order.
    - ``variant``: ``bh2`` (default; ``B(h) = e^{-h} - 1``, the default of the authors' diffusers
      scheduler) or ``bh1`` (``B(h) = -h``, the default of their reference code); the README's
      sampler benchmark compares them.
    - ``grid``: ``logsnr`` (default, uniform in lambda = log(alpha/sigma): Lu et al. 2022's
      choice for low-resolution data; the reference code defaults to ``time``) or ``time``.
    - ``sigma_min`` (0.01): the noise level ``sigma/alpha`` where the grid ends: the reference code's
      ``t_end = 1/N`` (t = 1e-3 on the VP SDE, a DDPM's step 0); None: the process's t_min.
    - ``lower_order_final`` (True): with fewer than 10 steps the last steps drop to the orders left,
      DPM-Solver's rule (UniPC's code drops them at any step count, which costs accuracy at 10 steps:
      README, sampler benchmark).
    - ``denoise_to_zero`` (False): True returns x0_hat at the last time instead of x (one more NFE).

    ``steps`` = M steps (default 20), M + 1 grid times; NFE = M (+ 1 with ``denoise_to_zero``; on a
    DDPM, logSNR times that round to the same integer step are merged first).
    """
    _check_solver(order, grid)
    check_value("variant", variant, UniPCVariant)
    den = CountedDenoiser(denoise_fn, process, clip, callback)
    g = _log_snr_grid(process, sampler_grid("unipc", process, steps, grid=grid, sigma_min=sigma_min))
    m = len(g.times) - 1
    x = _prior(process, shape, generator, device)
    history = [(g.lambdas[0], den(x, g.times[0]))]
    for i in range(1, m + 1):
        k = _step_order(order, len(history), i, m, lower_order_final)
        x_pred = _unipc_step(x, history, k, g, i, variant)
        if i == m:
            x = x_pred
            break
        x0_new = den(x_pred, g.times[i])
        x = _unipc_step(x, history, k, g, i, variant, x0_new)
        history = [*_newest(history, order - 1), (g.lambdas[i], x0_new)]
    if denoise_to_zero:
        x = den(x, g.times[-1])
    return SamplerOutput(x, den.nfe)


def _denoised_from_grad(process: GaussianProcess, x: Tensor, grad: Tensor, t: float,
                        clip: tuple[float, float] | None) -> Tensor:
    """Tweedie's x0_hat from the energy's gradient at time t: ``(x - sigma_t^2 grad E) / alpha_t``
    (the score is ``-grad E``), clamped to ``clip``."""
    x0 = (x - _at(process.sigma, t) ** 2 * grad) / _at(process.alpha, t)
    return x0 if clip is None else x0.clamp(*clip)


def adapted_acceptance(kernel: str, adapt: bool, target_acceptance: float | None) -> float | None:
    """The acceptance rate :func:`annealed_mcmc` adapts its step to (None: no adaptation): ``target_acceptance``,
    or the kernel's optimum (:data:`TARGET_ACCEPTANCE`); an :class:`OptionError` where the options contradict
    each other (a target for ULA, which accepts every move; a target with ``adapt=False``; a target of 1,
    which no step > 0 reaches)."""
    if target_acceptance is not None:
        if kernel == "ula":
            raise OptionError("target_acceptance", target_acceptance, "kernel='ula' accepts every move, so there is no "
                              "acceptance to adapt its step to", "use kernel='mala' or 'hmc', or drop target_acceptance")
        if not adapt:
            raise OptionError("target_acceptance", target_acceptance, "adapt=False keeps step_scale fixed, so no "
                              "acceptance is targeted", "drop target_acceptance, or set adapt: true")
        if target_acceptance >= 1:
            raise OptionError("target_acceptance", target_acceptance, "must be below 1 (only a step of 0 accepts "
                              "every move)", "e.g. 0.57 for MALA, 0.65 for HMC")
        return float(target_acceptance)
    return TARGET_ACCEPTANCE.get(kernel) if adapt else None


@torch.no_grad()
def annealed_mcmc(denoise_fn: Denoiser, process: GaussianProcess, shape: tuple[int, ...], *,
                  steps: int | None = None, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu", clip: tuple[float, float] | None = None,
                  callback: Callback | None = None, energy_fn: EnergyFn | None = None,
                  kernel: MCMCKernel = "mala", mcmc_steps: NonNegativeInt = 2, step_scale: Positive = 0.1,
                  leapfrog_steps: PositiveInt = 3, variance: AncestralVariance = "fixedsmall",
                  adapt: bool = True, target_acceptance: Fraction | None = None) -> SamplerOutput:
    """MCMC-corrected ancestral sampling on an energy (Du et al. 2023, "Reduce, Reuse, Recycle":
    annealed ULA / MALA / HMC interleaved with the reverse diffusion; their HMC is unadjusted (UHMC),
    ours, :mod:`lightning_diffusion.mcmc`'s, has Metropolis' test).

    ``energy_fn(x_t, t) -> E [B]`` is the energy of the noised marginal at the process's time t,
    ``p_t(x) ∝ exp(-E(x, t))``; its gradient gives the score ``-grad E`` and with it the denoiser
    ``x0_hat = (x - sigma_t^2 grad E) / alpha_t`` (Tweedie). On the grid t_0 > ... > t_{N-1} of
    :func:`ancestral`: from the prior at t_0, each step is an ancestral step (:func:`ancestral_step`,
    ``variance``) from t_{i-1} to t_i with x0_hat at t_{i-1}, then ``mcmc_steps`` (K) moves of
    ``kernel`` on exp(-E(., t_i)) by :mod:`lightning_diffusion.mcmc`'s kernels; x0_hat at t_{N-1}
    is returned. The reverse step only proposes where the next level's mass is; the moves (with
    Metropolis' test for ``mala`` and ``hmc``) pull the samples towards p_{t_i} itself, correcting the
    few-step reverse process's error (or, for a sum of energies, the error of summing scores).
    ``denoise_fn`` is not called: the energy's gradient is the denoiser, so the reverse step and
    the moves sample one and the same model.

    Step size tied to the noise level: the Langevin time of a move is ``step_scale * sigma_t^2``, i.e.
    the kernels' step ``eps = sqrt(2 step_scale) sigma_t`` (the proposal's noise std for ``ula`` and
    ``mala``, the leapfrog step for ``hmc``), a fraction of the noise's own scale at that level
    (R3 scales its steps with the DDPM's ``beta_t``, the variance the level adds, with a constant
    tuned per task; ``sigma_t^2`` is the variance of the level itself, which keeps the move's size
    relative to the width of p_t at every level of any process).

    Step adaptation (``adapt``, default on for ``mala`` and ``hmc``): no single ``step_scale`` suits
    every level (p_t is about N(0, sigma_t^2) at high noise, where a large scale is mostly rejected,
    and much wider than sigma_t near t = 0, where a small one barely moves: on the product of two
    2-D mixtures a fixed 0.1 leaves the covariance 13 standard errors off, README), so ``step_scale``
    is only the first level's and the step follows the acceptance: after every move,
    ``log step_scale += ADAPT_GAIN * (a - target_acceptance)`` with ``a`` that move's acceptance rate
    over the batch's chains (Robbins-Monro on the log step, Andrieu & Thoms 2008, sec. 5), carried
    from level to level in units of ``sigma_t^2`` so the schedule still follows the noise.
    ``target_acceptance`` defaults to the kernel's optimum, :data:`TARGET_ACCEPTANCE` (MALA 0.57,
    Roberts & Rosenthal 1998; HMC 0.65, Neal 2011); ``ula`` accepts every move and is not adapted.

    Adapting while sampling makes the chain non-stationary (its kernel changes from move to move), and
    an adaptive chain can in general lose its target (Andrieu & Thoms 2008, sec. 2; Roberts & Rosenthal
    2009 ask for diminishing adaptation). Here no chain is run to stationarity, only the law at the
    end level matters, and each move is still exact: the step of a move is fixed before it, from the
    earlier moves of the whole population of B chains, so each move is a MALA/HMC kernel that leaves
    p_t invariant, whatever its step (a chain's own past enters the step only through its 1/B share
    of the mean acceptance; with very few chains, B = 1 at the extreme, that share is the whole and
    the step follows each chain's own accept/reject history: pass ``adapt=False`` there if exactness
    matters). This is the adaptation of adaptive sequential Monte Carlo, which tunes
    each stage's kernels from the population at the previous one (Fearnhead & Taylor 2013; Buchholz,
    Chopin & Jacob 2021, HMC within SMC). The step at the last levels lags behind (sigma_t falls fast
    there; the acceptance at the last level stays ~1), which is safe, only slower mixing.
    ``adapt=False`` keeps ``step_scale`` fixed at every level (the kernels' own acceptance then says
    whether it suits).

    Options: ``kernel`` (``mala``, default; ``ula``; ``hmc`` with ``leapfrog_steps`` leapfrog steps,
    a fresh momentum per move), ``mcmc_steps`` K per level (default 2; 0: plain ancestral sampling
    on the energy's denoiser), ``step_scale`` (0.1: the first level's, or every level's with
    ``adapt=False``), ``leapfrog_steps`` (3), ``variance`` (ancestral's), ``adapt`` (True),
    ``target_acceptance`` (None: the kernel's optimum; a rate in (0, 1), ``mala``/``hmc`` only).

    ``callback`` is called once per level, after its moves, with ``{'x', 'i', 't', 'sigma',
    'denoised', 'acceptance', 'step_scale', 'step_size', 'nfe'}``: ``i`` the level index from 0,
    ``acceptance`` the level's Metropolis acceptance rate (mean over chains and its K moves; 1.0 for
    ``ula`` and where no move was made), ``step_scale`` the step of the level's last move in units
    of sigma_t^2 and ``step_size`` the same in data units (``sqrt(2 step_scale) sigma_t``), ``nfe``
    the evaluations so far.

    ``steps``: grid points N (default 100, or the T steps of a shorter DDPM); NFE counts energy-and-gradient evaluations:
    ``N + (N - 1) K`` (``ula``, ``mala``) or ``N + (N - 1) K leapfrog_steps`` (``hmc``).
    """
    check_value("kernel", kernel, MCMCKernel)
    if energy_fn is None:
        raise OptionError("sampler", "annealed_mcmc", "the annealed_mcmc sampler needs energy_fn, the energy E(x_t, t)",
                          "pass energy_fn (a model with parameterization: energy passes its own)")
    grid = sampler_grid("annealed_mcmc", process, steps)
    x = _prior(process, shape, generator, device)

    def at(t: float) -> Callable[[Tensor], Tensor]:
        """The energy of level t as the kernels take it: a function of x alone."""
        return lambda y: energy_fn(y, torch.full((y.shape[0],), float(t), dtype=y.dtype, device=y.device))

    target = adapted_acceptance(kernel, adapt, target_acceptance)
    chains = Chains(Target(at(grid[0])), x)
    one = per_sample(1.0, chains.x)
    x0, scale = x, float(step_scale)
    for i, t in enumerate(grid):
        accepted, moves, used = chains.accepted.clone(), chains.moves, scale
        if i:
            chains.x = ancestral_step(process, chains.x, x0, grid[i - 1], t, variance, generator)
            chains.set_energy(at(t))
            for _ in range(mcmc_steps):  # one move at a time: the step of each follows the last one's acceptance
                used, before = scale, chains.accepted.clone()
                eps = math.sqrt(2 * used) * _at(process.sigma, t) * one
                if kernel == "hmc":
                    chains.hmc(1, eps, leapfrog_steps, one, generator)
                else:
                    chains.langevin(1, eps, one, kernel == "mala", generator)
                if target is not None:
                    scale *= math.exp(ADAPT_GAIN * (float((chains.accepted - before).mean()) - target))  # on log scale
        x0 = _denoised_from_grad(process, chains.x, chains.state[1], t, clip)
        if callback is not None:
            made = chains.moves - moves
            rate = float((chains.accepted - accepted).mean()) / made if made else 1.0
            callback({"x": chains.x, "i": i, "t": float(t), "sigma": _at(process.ratio, float(t)), "denoised": x0,
                      "acceptance": rate, "step_scale": used, "step_size": math.sqrt(2 * used) * _at(process.sigma, t),
                      "nfe": chains.target.nfe})
    return SamplerOutput(x0, chains.target.nfe)


GridRule = Callable[[GaussianProcess, Any, Any, dict], list]


class SamplerEntry(NamedTuple):
    """One sampler of :data:`SAMPLERS`: the function, its default step count and its grid rule, so
    that a new sampler is one entry here. Calling the entry calls the function."""

    run: Callable[..., SamplerOutput]  # run(denoise_fn, process, shape, *, steps, generator, device, clip, callback, **own)
    steps: Any  # default step count: an int, a function of the process, or None (adaptive: takes no steps)
    grid: GridRule  # (process, steps, default steps, options with the sampler's defaults) -> times, checked
    needs_energy: bool = False  # runs on the model's energy E(x_t, t) (``energy_fn``), not on the denoiser alone
    check: Callable[[dict], None] | None = None  # refuses combinations of options (all of them, defaults filled in)

    def __call__(self, *args: Any, **kwargs: Any) -> SamplerOutput:
        return self.run(*args, **kwargs)

    def default_steps(self, process: GaussianProcess) -> Any:
        """The step count when none is given: ``steps``, or ``steps(process)``."""
        return self.steps(process) if callable(self.steps) else self.steps


def _all_steps(process: GaussianProcess) -> int:
    """Ancestral's default: every step of a DDPM (T), 1000 on an SDE."""
    return int(process.t_max) + 1 if process.discrete else 1000


def _hundred_levels(process: GaussianProcess) -> int:
    """annealed_mcmc's default: 100 levels (each with its moves), or all T steps of a shorter DDPM."""
    return min(100, _all_steps(process))


#: every sampler by name, each with its default steps and grid: a new sampler is one entry
SAMPLERS: dict[str, SamplerEntry] = {
    "ancestral": SamplerEntry(ancestral, _all_steps, uniform_grid),
    "ddim": SamplerEntry(ddim, 50, uniform_grid),
    "euler_maruyama": SamplerEntry(euler_maruyama, 1000, uniform_grid),
    "pc": SamplerEntry(pc, 1000, uniform_grid),
    "ode": SamplerEntry(ode, None, _adaptive),
    "heun": SamplerEntry(heun, 18, _karras_steps),
    "dpm_solver": SamplerEntry(dpm_solver, 20, _solver_steps),
    "unipc": SamplerEntry(unipc, 20, _solver_steps),
    "annealed_mcmc": SamplerEntry(annealed_mcmc, _hundred_levels, uniform_grid, needs_energy=True,
                                  check=lambda o: adapted_acceptance(o["kernel"], o["adapt"], o["target_acceptance"])),
}

_COMMON = ("steps", "generator", "device", "clip", "callback")
#: the arguments of a sampler that are no options: the common ones and the energy (a model's, never a config's)
_ARGUMENTS = (*_COMMON, "energy_fn")


def registered(name: str) -> SamplerEntry:
    """The entry of sampler ``name``; an :class:`OptionError` naming the known ones otherwise."""
    return options.registered(SAMPLERS, name)


def sampler_options(name: str) -> list[str]:
    """The sampler-specific options of ``name`` (beyond steps, generator, device, clip, callback)."""
    params = inspect.signature(registered(name).run).parameters.values()
    return [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in _ARGUMENTS]


def check_options(name: str, process: GaussianProcess, steps: int | None = None, *, also: tuple[str, ...] = (),
                  energy: bool = False, **options: Any) -> None:
    """Raise :class:`OptionError` unless sampler ``name`` can run on ``process`` with ``steps`` and
    ``options``: a known sampler, only its own options, each of the kind its signature declares
    (:func:`~lightning_diffusion.options.check_call`), a step count its grid allows
    (:func:`sampler_grid`), and an energy where the sampler needs one (``needs_energy``;
    ``energy``: whether the caller has one). :func:`sample` calls it; a model calls it before
    training to refuse a callback's ``sample_options`` early. ``also``: the caller's own option
    names, listed with the sampler's in the message about an unknown option."""
    entry = registered(name)
    if entry.needs_energy and not energy:
        raise OptionError("sampler", name, f"the {name} sampler runs MCMC on the model's energy E(x_t, t), and this "
                          "model has none", "train a model with parameterization: energy, or choose a sampler that "
                          "needs only the denoiser (" + ", ".join(n for n, e in SAMPLERS.items() if not e.needs_energy) + ")")
    known = [*(["steps"] if entry.steps is not None else []), *also, *sampler_options(name)]
    check_call(entry.run, options, f"the {name} sampler", skip=_ARGUMENTS, listed=known)
    if entry.check is not None:
        entry.check({**defaults_of(entry.run), **options})
    sampler_grid(name, process, steps, **options)


def sample(name: str, denoise_fn: Denoiser, process: GaussianProcess, shape: tuple[int, ...], *,
           steps: int | None = None, generator: torch.Generator | None = None,
           device: torch.device | str = "cpu", clip: tuple[float, float] | None = None,
           callback: Callback | None = None, energy_fn: EnergyFn | None = None,
           **options: Any) -> SamplerOutput:
    """Run the sampler called ``name`` on ``denoise_fn`` over ``process``; returns ``(x, nfe)``.

    Args:
        name: ``ancestral``, ``ddim``, ``euler_maruyama``, ``pc``, ``ode``, ``heun``,
            ``dpm_solver``, ``unipc`` or ``annealed_mcmc`` (the keys of :data:`SAMPLERS`).
        denoise_fn: ``denoise_fn(x_t, t) -> x0_hat``, the clean-data estimate at time ``t``
            (a float tensor [B] in the process's own time).
        process: the Gaussian process ``x_t = alpha(t) x_0 + sigma(t) eps`` (an SDE, or a DDPM
            schedule as :class:`~lightning_diffusion.diffusion.sde.DiscreteVP`).
        shape: shape of the batch of samples, ``[N, *data_shape]``.
        steps: the sampler's step count (None: the paper's default; see each sampler).
        generator: source of the sampling noise.
        device: device of the samples.
        clip: clamp x0_hat to this range at every evaluation (``(-1, 1)`` for images).
        callback: called at every network evaluation with ``{'x', 'i', 't', 'sigma', 'denoised'}``
            (:data:`Callback`); None: nothing.
        energy_fn: ``energy_fn(x_t, t) -> E [B]``, the energy ``-log p_t(x_t)`` up to a constant
            (nats) at time ``t`` (:data:`EnergyFn`), for a sampler that needs it (``needs_energy``:
            ``annealed_mcmc``); the others ignore it.
        **options: the sampler's own options, by keyword (:func:`sampler_options` lists them).
    """
    entry = registered(name)
    check_options(name, process, steps, energy=energy_fn is not None, **options)
    own = {"energy_fn": energy_fn} if entry.needs_energy else {}
    return entry(denoise_fn, process, shape, steps=steps, generator=generator, device=device,
                 clip=clip, callback=callback, **own, **options)
