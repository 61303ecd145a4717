"""Diffusion recovery likelihood (Gao et al. 2021, "Learning Energy-Based Models by Diffusion
Recovery Likelihood", ICLR; reference code ruiqigao/recovery_likelihood): the noise ladder, the
conditional EBM of each level and the sampler that walks the ladder down.

The ladder has ``L`` levels (the paper's default 6) and ``L + 1`` noisy copies of the data:
``x_0 = sqrt(1 - sigma_0^2) x + sigma_0 eps`` and ``x_{t+1} = sqrt(1 - sigma_{t+1}^2) x_t +
sigma_{t+1} eps``. The ``sigma_t`` are the paper's: the DDPM linear schedule of 1000 steps (beta
from 1e-4 to 0.02) grouped into jumps, the first ``L`` over the first half of the chain, in
``1000 // (2 (L - 1))`` steps each, and the last over the rest, so ``x_L`` is nearly N(0, I).

Level ``t`` (0 .. L - 1) has an energy ``E(y, t)`` of ``y = a_{t+1} x_t`` (``a = sqrt(1 - sigma^2)``)
and the conditional EBM

    p(y | x_{t+1}) ∝ exp(-E(y, t) - ||y - x_{t+1}||^2 / (2 sigma_{t+1}^2)),

whose Gaussian factor makes it nearly unimodal, so short-run Langevin from ``y = x_{t+1}`` samples
it. The top level (``t = L - 1``) has no Gaussian factor and ``a = 1``: it is the marginal EBM of
``x_{L-1}``, started from ``x_L``. At the optimum ``E(y, t)`` is ``-log p(y_t)`` up to a constant,
so ``E(a_1 x, 0)`` is the energy of the marginal of ``x_0`` (the data with noise of std sigma_0).

The Langevin step of level t is ``s_t = b sigma_{t+1} sqrt(sigmabar_t / sigmabar_0)`` with
``sigmabar_t`` the std of ``x_t`` given the data (the reference code's rule, ``s_t^2 = b^2 sigma_{t+1}^2
c_t^2`` with ``c_t^2 = sigmabar_t / sigmabar_0``: ``b sigma`` scaled up at the noisier levels),
``b^2 = 2e-4`` and K = 30 steps.
"""

# No `from __future__ import annotations`: the NamedTuple's fields must be evaluated types (pdoc).
import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from lightning_diffusion.likelihoods.bits import log_mean_exp
from lightning_diffusion.mcmc.ais import GaussianBase, ais, log_mean_stderr
from lightning_diffusion.mcmc.kernels import MCMCResult, langevin

LevelEnergy = Callable[[Tensor, Tensor], Tensor]
"""``energy(y [B, ...], level [B] int64) -> E [B]``: the level-conditioned energy in nats."""


class RecoveryLadder(NamedTuple):
    """The per-level coefficients of the ladder, each ``[L]`` (float64), indexed by level t."""

    signal: Tensor  # abar_t: x_t = abar_t x + sigmabar_t eps
    noise: Tensor  # sigmabar_t
    step_scale: Tensor  # a_{t+1}: x_{t+1} = a_{t+1} x_t + sigma_{t+1} eps
    step_noise: Tensor  # sigma_{t+1}
    y_scale: Tensor  # the energy's input y = y_scale x_t: a_{t+1}, 1 at the top level
    conditional: Tensor  # 1.0 where the level has the Gaussian factor (all but the top), else 0.0
    langevin_step: Tensor  # s_t / b = sigma_{t+1} sqrt(sigmabar_t / sigmabar_0)

    @property
    def levels(self) -> int:
        return self.signal.shape[0]


def recovery_ladder(levels: int = 6, beta_start: float = 1e-4, beta_end: float = 0.02,
                    chain_length: int = 1000) -> RecoveryLadder:
    """The paper's ladder of ``levels`` levels (reference ``get_sigma_schedule``): betas
    ``linspace(beta_start, beta_end, chain_length)``, jump ends at steps
    ``0, k, 2k, ..., (levels - 1) k`` with ``k = chain_length // (2 (levels - 1))``, then
    ``chain_length - 1``; ``a`` of a jump is the product of its steps' ``sqrt(1 - beta)``.
    Needs ``2 <= levels <= chain_length // 2 + 1``."""
    if not (isinstance(levels, int) and 2 <= levels <= chain_length // 2 + 1):
        raise ValueError(f"recovery_ladder: levels must be an integer in [2, {chain_length // 2 + 1}], got {levels!r}")
    betas = torch.linspace(beta_start, beta_end, chain_length, dtype=torch.float64)
    log_a = 0.5 * torch.log1p(-betas)
    stride = chain_length // (2 * (levels - 1))
    ends = [i * stride for i in range(levels)] + [chain_length - 1]
    starts = [0] + [e + 1 for e in ends[:-1]]
    a = torch.stack([log_a[s:e + 1].sum() for s, e in zip(starts, ends)]).exp()  # [L + 1]
    sigma = (1 - a**2).sqrt()
    abar = a.cumprod(0)
    sigmabar = (1 - abar**2).sqrt()
    y_scale = a[1:].clone()
    y_scale[-1] = 1.0
    conditional = torch.ones(levels, dtype=torch.float64)
    conditional[-1] = 0.0
    return RecoveryLadder(abar[:-1], sigmabar[:-1], a[1:], sigma[1:], y_scale, conditional,
                          sigma[1:] * (sigmabar[:-1] / sigmabar[0]).sqrt())


def _at(values: Tensor, level: Tensor, like: Tensor) -> Tensor:
    """``values[level]`` [B] in ``like``'s dtype and device, shaped [B, 1, ..., 1] to broadcast over it."""
    v = values.to(like.device)[level].to(like.dtype)
    return v.reshape(-1, *[1] * (like.dim() - 1))


def recovery_pairs(x: Tensor, level: Tensor, ladder: RecoveryLadder,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``(x_t, x_{t+1})`` of data ``x`` [B, ...] at per-sample levels ``level`` [B] (int64):
    ``x_t = abar_t x + sigmabar_t eps``, ``x_{t+1} = a_{t+1} x_t + sigma_{t+1} eps'``."""
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    x_t = _at(ladder.signal, level, x) * x + _at(ladder.noise, level, x) * eps
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x_t, _at(ladder.step_scale, level, x) * x_t + _at(ladder.step_noise, level, x) * eps


def conditional_energy(energy: LevelEnergy, y: Tensor, x_next: Tensor, level: Tensor, ladder: RecoveryLadder) -> Tensor:
    """The recovery conditional's energy [B] (nats) of ``y = a_{t+1} x_t`` given ``x_{t+1}``:
    ``E(y, t) + ||y - x_{t+1}||^2 / (2 sigma_{t+1}^2)`` (the Gaussian term only below the top level)."""
    gauss = (y - x_next).pow(2).flatten(1).sum(1) / (2 * _at(ladder.step_noise, level, y).flatten() ** 2)
    return energy(y, level) + _at(ladder.conditional, level, y).flatten() * gauss


def recovery_langevin(energy: LevelEnergy, x_next: Tensor, level: Tensor, ladder: RecoveryLadder, *,
                      step_factor: float, steps: int = 30, metropolis: bool = False, grad_clip: float | None = None,
                      generator: torch.Generator | None = None) -> MCMCResult:
    """Samples of ``x_t`` given ``x_{t+1}`` [B, ...] at levels ``level`` [B]: ``steps`` Langevin
    (``metropolis``: MALA) steps of size ``s_t = step_factor * langevin_step[t]`` on
    :func:`conditional_energy` from ``y = x_{t+1}``, returned as ``x_t = y / y_scale_t``
    (:class:`~lightning_diffusion.mcmc.MCMCResult`, ``energy`` the conditional's)."""
    if not step_factor > 0:
        raise ValueError(f"recovery_langevin: step_factor must be positive, got {step_factor}")
    step = step_factor * _at(ladder.langevin_step, level, x_next).flatten()
    out = langevin(lambda y: conditional_energy(energy, y, x_next, level, ladder), x_next, step_size=step, steps=steps,
                   metropolis=metropolis, grad_clip=grad_clip, generator=generator)
    return out._replace(x=out.x / _at(ladder.y_scale, level, out.x))


def recovery_sample(energy: LevelEnergy, x_top: Tensor, ladder: RecoveryLadder, *, step_factor: float,
                    steps: int = 30, metropolis: bool = False, grad_clip: float | None = None,
                    generator: torch.Generator | None = None) -> MCMCResult:
    """The ladder walked down (reference ``p_sample_progressive``): from ``x_L = x_top`` (N(0, I)
    draws), :func:`recovery_langevin` at levels ``L - 1, ..., 0``, each started from the level above's
    sample. Returns ``x_0`` with the mean acceptance and gradient norm over levels and the total NFE."""
    x, acceptance, grad_norm, nfe = x_top, 0.0, 0.0, 0
    energies = None
    for t in reversed(range(ladder.levels)):
        level = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        out = recovery_langevin(energy, x, level, ladder, step_factor=step_factor, steps=steps, metropolis=metropolis,
                                grad_clip=grad_clip, generator=generator)
        x, energies = out.x, out.energy
        acceptance, grad_norm, nfe = acceptance + out.acceptance, grad_norm + out.grad_norm, nfe + out.nfe
    return MCMCResult(x, energies, acceptance / ladder.levels, grad_norm / ladder.levels, nfe)


class RecoveryNormalizers(NamedTuple):
    """What :func:`recovery_log_normalizers` returns: per sample (level and ``x_{t+1}``)."""

    log_z: Tensor  # [B] float64: AIS's log Z (nats) of each conditional, in y: a stochastic lower bound
    stderr: Tensor  # [B] float64: its delta-method standard error over the chains (Monte Carlo error only)
    log_weights: Tensor  # [B, K] float64: the AIS log weights of each sample's K chains (log mean exp = log_z)
    acceptance: float  # mean acceptance of the AIS transitions
    nfe: int  # batched evaluations of the energy and its gradient


def recovery_log_normalizers(energy: LevelEnergy, x_next: Tensor, level: Tensor, ladder: RecoveryLadder, *,
                             chains: int, step_size: float, betas: int = 100, base_mean: Tensor | None = None,
                             base_std: Tensor | None = None, transition: str = "mala",
                             generator: torch.Generator | None = None) -> RecoveryNormalizers:
    """``log Z_t(x_{t+1}) = log ∫ exp(-E(y, t) - ||y - x_{t+1}||^2 / (2 sigma_{t+1}^2)) dy`` (nats) of the
    recovery conditional (:func:`conditional_energy`) of each sample of ``x_next`` [B, ...] at its
    level ``level`` [B] (the top level, without the Gaussian term: the marginal's ``log ∫ exp(-E(y, L-1)) dy``),
    by forward AIS (:func:`~lightning_diffusion.mcmc.ais`) with ``chains`` chains per sample through
    ``betas`` sigmoid-spaced bridges, one ``transition`` move each.

    The AIS base of a sample is the diagonal Gaussian ``N(base_mean, base_std^2)`` in y (per sample,
    shaped like ``x_next``); None: the conditional's Gaussian part ``N(x_{t+1}, sigma_{t+1}^2 I)``
    (refused at the top level, which has none). The chains run in that base's whitened coordinates
    ``u = (y - base_mean) / base_std``, where the base is N(0, I) for every sample (so one AIS run
    serves them all, and ``step_size`` is MALA's step in units of the base's std), and
    ``log Z_y = log Z_u + sum log base_std``. Forward AIS is unbiased in Z, so each ``log_z`` errs
    low in expectation (Jensen); ``stderr`` is its Monte Carlo error over the K chains, not the bias."""
    if not (isinstance(chains, int) and chains >= 2):
        raise ValueError(f"recovery_log_normalizers: chains must be an integer >= 2, got {chains!r}")
    conditional = _at(ladder.conditional, level, x_next)
    if base_mean is None:
        if not bool((conditional > 0).all()):
            raise ValueError("recovery_log_normalizers: the top level has no Gaussian term to start AIS from: "
                             "give base_mean and base_std")
        base_mean, base_std = x_next, _at(ladder.step_noise, level, x_next).expand_as(x_next)
    base_std = torch.as_tensor(base_std, dtype=x_next.dtype, device=x_next.device).expand_as(x_next)
    size = x_next.shape[0]

    def repeat(v: Tensor) -> Tensor:
        return v.repeat_interleave(chains, 0)

    mean_r, std_r, next_r, level_r = repeat(base_mean.to(x_next)), repeat(base_std), repeat(x_next), repeat(level)

    def whitened(u: Tensor) -> Tensor:
        return conditional_energy(energy, mean_r + std_r * u, next_r, level_r, ladder)

    unit = GaussianBase(torch.zeros_like(x_next[0]), std=1.0)
    out = ais(whitened, unit, size * chains, step_size=step_size, betas=betas, transition=transition,
              generator=generator)
    log_w = out.log_weights.reshape(size, chains)
    log_det = base_std.to(torch.float64).log().flatten(1).sum(1)
    stderr = torch.tensor([log_mean_stderr(row) for row in log_w], dtype=torch.float64, device=log_w.device)
    return RecoveryNormalizers(log_mean_exp(log_w, dim=-1) + log_det, stderr, log_w, out.acceptance, out.nfe)


#: the paper's step-size factor b (reference ``mcmc_step_size_b_square = 2e-4``)
PAPER_STEP_FACTOR = math.sqrt(2e-4)

__all__ = ["LevelEnergy", "PAPER_STEP_FACTOR", "RecoveryLadder", "RecoveryNormalizers", "conditional_energy",
           "recovery_ladder", "recovery_langevin", "recovery_log_normalizers", "recovery_pairs", "recovery_sample"]
