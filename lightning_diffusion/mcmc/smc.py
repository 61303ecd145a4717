"""Sequential Monte Carlo sampler (Del Moral, Doucet & Jasra 2006) along the AIS path: samples of
``exp(-E) / Z`` with their mode weights, and log Z with a standard error.

The path, the schedule and the weights are :mod:`.ais`'s: the bridges ``E_b = (1 - b) E_q + b E``
from a normalised :class:`~.ais.GaussianBase` q (b = 0) to the target (b = 1), the incremental log
weight ``-(b_t - b_{t-1}) (E - E_q)(x)`` at each b_t, and MALA or HMC moves leaving ``f_{b_t}``
invariant. What SMC adds to AIS is *resampling*: when the effective sample size of a population's
weights falls below ``ess_threshold * n``, its particles are redrawn in proportion to their weights
(and the weights reset), so particles stuck in a mode that the tempered target no longer favours die
and those in favoured modes multiply. A single chain (or AIS without resampling) keeps the base's
mode weights; SMC's particles follow the target's.

Resampling is *systematic* (one uniform per population, n evenly spaced points on the weights'
CDF): unbiased like multinomial, with lower variance and O(n) cost; the error estimate below does
not depend on the scheme (it uses independent populations, not multinomial resampling theory).

Standard error: the particles are split into ``islands`` independent populations (Vergé et al.
2015), each resampled on its own. Each island's estimate ``Z_m`` is unbiased for Z, so
``Z = mean_m Z_m`` and its delta-method error ``sd(Z_m) / (sqrt(M) mean(Z_m))`` (nats) is an honest
Monte Carlo error from M independent runs at no extra cost; log Z is, like AIS's, a stochastic lower
bound (``E[log Z_hat] <= log Z``) whose bias the error does not include.
"""

# No `from __future__ import annotations`: the NamedTuple's fields must be evaluated types (pdoc).
import math
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from lightning_diffusion.mcmc.ais import GaussianBase, Transition, _betas, _check_transition, _Path, log_mean_exp, \
    log_mean_stderr
from lightning_diffusion.mcmc.kernels import Energy, Target

#: the acceptance rate the step adaptation aims at: MALA's optimum in high dimension (Roberts &
#: Rosenthal 1998), HMC's (Beskos et al. 2013)
TARGET_ACCEPTANCE = {"mala": 0.574, "hmc": 0.651}


class SMCResult(NamedTuple):
    """What :func:`smc` returns."""

    x: Tensor  # the particles [N, ...] (island m holds rows m * n ... (m + 1) * n - 1): weighted samples of exp(-E) / Z
    log_weights: Tensor  # [N] float64, their final log weights (w_i / sum w: the samples' weights; log_mean_exp(log_weights) = log_z)
    log_z: float  # the estimate of log Z (nats): log mean_m Z_m over the islands, a stochastic lower bound
    stderr: float  # its standard error from the spread of the islands' Z_m (nats; nan with one island)
    ess: Tensor  # [T] the mean over islands of the ESS fraction (ESS / n, in (0, 1]) after reweighting at each b_t
    resampled: Tensor  # [T] how many islands resampled at each b_t
    acceptance: Tensor  # [T] mean acceptance rate of the moves at each b_t
    step_size: Tensor  # [T] the step of the moves at each b_t (adapted: see :func:`smc`)
    island_log_z: Tensor  # [M] float64, each island's log Z_m
    nfe: int  # batched evaluations of the target energy and its gradient


def systematic_resample(log_w: Tensor, generator: torch.Generator | None = None, num: int | None = None) -> Tensor:
    """Systematic resampling of each row of ``log_w`` [M, n]: ``num`` (default n) indices [M, num]
    into the row, each drawn with probability ∝ its weight, from one uniform ``U`` per row and the
    points ``(U + j) / num`` on the weights' CDF (so each index's count is within 1 of ``num`` times
    its weight: fewer draws than particles lose less than a random subset would)."""
    rows, n = log_w.shape
    num = n if num is None else num
    cdf = torch.softmax(log_w.to(torch.float64), dim=1).cumsum(1)
    u = torch.rand(rows, 1, generator=generator, dtype=torch.float64, device=log_w.device)
    points = (u + torch.arange(num, dtype=torch.float64, device=log_w.device)) / num
    return torch.searchsorted(cdf, points).clamp_max(n - 1)


def _ess_fraction(log_w: Tensor) -> Tensor:
    """Kish's ESS of each row's weights over the row's length [M] (in (0, 1])."""
    return (2 * torch.logsumexp(log_w, 1) - torch.logsumexp(2 * log_w, 1)).exp() / log_w.shape[1]


def smc(energy: Energy, base: GaussianBase, num_particles: int, *, step_size: float,
        betas: int | Sequence[float] = 100, transition: Transition = "mala", moves_per_beta: int = 1,
        leapfrog_steps: int = 10, ess_threshold: float = 0.5, islands: int = 8, adapt_step: bool = True,
        step_jitter: float = 10.0, grad_clip: float | None = None, generator: torch.Generator | None = None) -> SMCResult:
    """SMC samples of ``exp(-E(x)) / Z`` and ``log Z`` (nats), from ``num_particles`` particles drawn
    from ``base`` (see the module docstring for the path, the resampling and the error).

    Args:
        energy: ``E(x [B, ...]) -> [B]`` (nats).
        base: the normalised start of the path.
        num_particles: N, split into ``islands`` equal populations (N divisible by ``islands``, at
            least 2 particles each).
        step_size: the initial step of the moves (data units): MALA's noise std, HMC's leapfrog step.
        betas: the schedule from 0 to 1, or a number T of temperatures for :func:`~.ais.sigmoid_betas`
            (AIS's schedule); the particles move at each of b_1 ... b_T (b_T = 1 included).
        transition: ``mala`` or ``hmc`` (``leapfrog_steps`` leapfrog steps per move).
        moves_per_beta: moves at each temperature (each costs one evaluation, HMC ``leapfrog_steps``).
        ess_threshold: an island resamples when its ESS falls below this fraction of its size
            (0: never, which is AIS in islands; 1: at every temperature).
        islands: M independent populations, for the standard error (1: none, stderr nan).
        adapt_step: after the moves at each temperature, multiply the step by
            ``exp(2 (acceptance - target))`` (target :data:`TARGET_ACCEPTANCE`), so the step follows the
            bridges' scale from the base's to the target's; the moves at each b stay exact (the step
            is fixed while they run). False: ``step_size`` throughout.
        step_jitter: each particle's step in each move is the step times ``exp(-U)``, ``U ~ U(0, log
            step_jitter)``: a spread of scales so that particles in a narrow mode and in a wide one
            both move (one step cannot suit both: in the tests a 0.2-wide and a 0.8-wide mode; it halved
            the seed-to-seed spread of the mode weights, 0.030 to 0.017). The step is drawn
            independently of the state, so each move stays an exact MALA/HMC kernel. 1: no jitter.
        grad_clip: clip each particle's ||grad E|| (None: off).
        generator: every random draw.

    Returns :class:`SMCResult`: particles with their final weights (resample them, e.g. with
    :func:`systematic_resample`, for unweighted samples), log Z and its error, and the history.
    """
    if not (isinstance(islands, int) and islands >= 1):
        raise ValueError(f"islands must be a positive integer, got {islands!r}")
    if not (isinstance(num_particles, int) and num_particles >= 2 * islands and num_particles % islands == 0):
        raise ValueError(f"num_particles must be a multiple of islands={islands} with at least 2 particles per "
                         f"island, got {num_particles!r}")
    if not 0.0 <= ess_threshold <= 1.0:
        raise ValueError(f"ess_threshold must be a fraction in [0, 1], got {ess_threshold}")
    _check_transition(transition, step_size, moves_per_beta)
    if moves_per_beta < 1:
        raise ValueError(f"moves_per_beta must be >= 1 (SMC moves its particles at every temperature), got {moves_per_beta}")
    if not step_jitter >= 1.0:
        raise ValueError(f"step_jitter must be >= 1 (the ratio of the largest to the smallest step), got {step_jitter}")
    log_jitter = math.log(step_jitter)
    schedule = _betas(betas)
    size = num_particles // islands
    path = _Path(Target(energy, grad_clip), base)
    x = base.sample(num_particles, generator)
    path.beta = schedule[0]
    state = path(x)
    log_w = torch.zeros(islands, size, dtype=torch.float64, device=x.device)
    log_z = torch.zeros(islands, dtype=torch.float64, device=x.device)  # each island's log Z so far, at resamplings
    offsets = (torch.arange(islands, device=x.device) * size)[:, None]
    history: dict[str, list[float]] = {"ess": [], "resampled": [], "acceptance": [], "step_size": []}
    eps = float(step_size)
    for t in range(1, len(schedule)):
        log_w += path.log_weight_increment(state, schedule[t]).reshape(islands, size)
        ess = _ess_fraction(log_w)
        resample = ess < ess_threshold
        history["ess"].append(float(ess.mean()))
        history["resampled"].append(int(resample.sum()))
        if bool(resample.any()):
            log_z = torch.where(resample, log_z + log_mean_exp(log_w, dim=1), log_z)
            index = torch.where(resample[:, None], systematic_resample(log_w, generator),
                                torch.arange(size, device=x.device))
            index = (index + offsets).reshape(-1)
            x, state = x[index], tuple(s[index] for s in state)
            log_w = torch.where(resample[:, None], torch.zeros_like(log_w), log_w)
        path.beta = schedule[t]
        state = path.combine(state)
        accepted = 0.0
        for _ in range(moves_per_beta):
            spread = torch.rand(x.shape[0], generator=generator, dtype=x.dtype, device=x.device) * log_jitter
            x, state, acc = path.move(x, state, transition, eps * torch.exp(-spread), leapfrog_steps, generator)
            accepted += float(acc.mean())
        rate = accepted / moves_per_beta
        history["acceptance"].append(rate)
        history["step_size"].append(eps)
        if adapt_step:
            eps *= math.exp(2 * (rate - TARGET_ACCEPTANCE[transition]))
    final = (log_z[:, None] + log_w).reshape(-1)  # mean over all particles of exp(final) = mean_m Z_m
    island_log_z = log_z + log_mean_exp(log_w, dim=1)
    stderr = log_mean_stderr(island_log_z) if islands > 1 else float("nan")
    as_tensor = {k: torch.tensor(v, dtype=torch.float64) for k, v in history.items()}
    return SMCResult(x, final, float(log_mean_exp(final, dim=-1)), stderr, as_tensor["ess"], as_tensor["resampled"].long(), as_tensor["acceptance"],
                     as_tensor["step_size"], island_log_z, path.target.nfe)


__all__ = ["SMCResult", "TARGET_ACCEPTANCE", "smc", "systematic_resample"]
