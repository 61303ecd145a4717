"""Annealed importance sampling (Neal 2001) for the log partition function, forward and reverse (BDMC).

The path runs from a normalised Gaussian base ``q`` to the unnormalised target ``f(x) = exp(-E(x))``
through the geometric bridges ``f_b(x) = q(x)^(1-b) exp(-E(x))^b``, b from 0 to 1, i.e. the energies
``E_b = (1 - b) E_q + b E`` with ``E_q = -log q``. A chain started from q gets the log weight
``sum_t log f_{b_t}(x_{t-1}) - log f_{b_{t-1}}(x_{t-1}) = -sum_t (b_t - b_{t-1}) (E(x_{t-1}) - E_q(x_{t-1}))``
with a MALA or HMC move leaving f_{b_t} invariant between; ``E[w] = Z``, so
``log Z ≈ log mean w`` (nats).

Which side each errs on (Grosse et al. 2015, "Sandwiching the marginal likelihood using
bidirectional Monte Carlo"): forward AIS is unbiased in Z, hence by Jensen a stochastic *lower*
bound on log Z (``E[log mean w] <= log Z``); run backwards from exact target samples (possible for
synthetic data or a model with exact samples) the weights are unbiased for 1/Z, so
``-log mean w_rev`` is a stochastic *upper* bound. The gap between the two bounds the error of both.
"""

# No `from __future__ import annotations`: the NamedTuple's fields must be evaluated types (pdoc).
import math
from typing import Literal, NamedTuple, Sequence

import torch
from torch import Tensor

from lightning_diffusion.likelihoods.bits import log_mean_exp  # one definition for AIS and IWAE; mcmc re-exports it
from lightning_diffusion.mcmc.kernels import Energy, Target, _check_positive, _check_steps, energy_and_grad, hmc_move, \
    langevin_move, per_sample

Transition = Literal["mala", "hmc"]


class GaussianBase:
    """A normalised Gaussian ``q = N(mean, Sigma)`` over data of the shape of ``mean`` (flattened to D
    values): diagonal (``std``, shaped like ``mean`` or a scalar) or full (``scale_tril`` L [D, D],
    ``Sigma = L L^T``). Its energy ``E_q(x) = -log q(x)`` (nats) is the start of an AIS path.

    Args:
        mean: the mean, shaped like one sample.
        std: per-dimension standard deviations (diagonal base).
        scale_tril: lower-triangular Cholesky factor of the covariance (full base).
    """

    def __init__(self, mean: Tensor, std: Tensor | float | None = None, scale_tril: Tensor | None = None):
        if (std is None) == (scale_tril is None):
            raise ValueError("GaussianBase needs exactly one of std (diagonal) or scale_tril (full covariance)")
        self.mean = torch.as_tensor(mean)
        self.dim = self.mean.numel()
        if std is not None:
            self.std = torch.as_tensor(std, dtype=self.mean.dtype, device=self.mean.device).expand(self.mean.shape)
            self.std = self.std.reshape(-1).clone()
            _check_positive(self.std, "std")
            self.scale_tril, self._log_det_half = None, self.std.log().sum()
        else:
            if scale_tril.shape != (self.dim, self.dim):
                raise ValueError(f"scale_tril must be [D, D] with D = {self.dim}, got {list(scale_tril.shape)}")
            self.std, self.scale_tril = None, scale_tril.to(self.mean)
            self._log_det_half = self.scale_tril.diagonal().abs().log().sum()

    def _whiten(self, x: Tensor) -> Tensor:
        """``L^-1 (x - mean)`` [B, D]."""
        z = (x - self.mean).flatten(1)
        if self.std is not None:
            return z / self.std
        return torch.linalg.solve_triangular(self.scale_tril, z.T, upper=False).T

    def log_prob(self, x: Tensor) -> Tensor:
        """``log q(x) = -||L^-1 (x - mean)||^2 / 2 - log det L - (D / 2) log 2 pi`` [B] (nats)."""
        return -0.5 * self._whiten(x).pow(2).sum(1) - self._log_det_half - 0.5 * self.dim * math.log(2 * math.pi)

    def energy(self, x: Tensor) -> Tensor:
        """``E_q(x) = -log q(x)`` [B] (nats)."""
        return -self.log_prob(x)

    def sample(self, num: int, generator: torch.Generator | None = None) -> Tensor:
        """``num`` samples ``mean + L xi`` [num, *mean.shape]."""
        xi = torch.randn(num, self.dim, generator=generator, dtype=self.mean.dtype, device=self.mean.device)
        z = xi * self.std if self.std is not None else xi @ self.scale_tril.T
        return self.mean + z.reshape(num, *self.mean.shape)


def gaussian_base(data: Tensor, *, full: bool = False, min_std: float = 1e-3) -> GaussianBase:
    """The Gaussian fitted to ``data`` [N, ...] by moments (computed in float64): the mean and either
    the per-dimension std (``full=False``, floored at ``min_std``) or the covariance
    ``(X - m)^T (X - m) / (N - 1) + min_std^2 I`` (``full=True``, D x D: mind D for images)."""
    if data.dim() < 2 or data.shape[0] < 2:
        raise ValueError(f"gaussian_base needs data [N >= 2, ...], got shape {list(data.shape)}")
    flat = data.detach().flatten(1).to(torch.float64)
    mean = flat.mean(0)
    if not full:
        std = flat.std(0).clamp_min(min_std)
        return GaussianBase(mean.reshape(data.shape[1:]).to(data.dtype), std=std.reshape(data.shape[1:]).to(data.dtype))
    centred = flat - mean
    cov = centred.T @ centred / (flat.shape[0] - 1) + min_std**2 * torch.eye(flat.shape[1], dtype=torch.float64,
                                                                          device=flat.device)
    return GaussianBase(mean.reshape(data.shape[1:]).to(data.dtype), scale_tril=torch.linalg.cholesky(cov).to(data.dtype))


def sigmoid_betas(steps: int, delta: float = 4.0) -> Tensor:
    """The sigmoidal schedule of Grosse et al. (2015): ``steps + 1`` values (float64) from 0 to 1,
    ``b_t ∝ sigmoid(delta (2t / steps - 1))`` rescaled to [0, 1]: dense near both ends."""
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"the AIS schedule needs steps >= 1, got {steps!r}")
    s = torch.sigmoid(torch.linspace(-delta, delta, steps + 1, dtype=torch.float64))
    return (s - s[0]) / (s[-1] - s[0])


def effective_sample_size(log_w: Tensor) -> float:
    """Kish's ESS of importance weights, ``(sum w)^2 / sum w^2``, in (0, N]."""
    log_w = log_w.to(torch.float64)
    return float((2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0)).exp())


def log_mean_stderr(log_w: Tensor) -> float:
    """Delta-method standard error of ``log mean w``: ``sd(w) / (sqrt(N) mean(w))`` (nats)."""
    w = (log_w.to(torch.float64) - log_w.max()).exp()
    return float(w.std() / (math.sqrt(w.numel()) * w.mean()))


class AISResult(NamedTuple):
    """What :func:`ais` and :func:`reverse_ais` return."""

    log_z: float  # the estimate of log Z (nats): a stochastic lower bound (ais) or upper bound (reverse_ais)
    stderr: float  # its delta-method standard error (nats): Monte Carlo error only, not the bias
    ess: float  # effective sample size of the weights, in (0, N]
    log_weights: Tensor  # [N] float64: log w (ais, mean w ≈ Z) or log w_rev (reverse_ais, mean w_rev ≈ 1 / Z)
    x: Tensor  # the chains' final states: ≈ target samples (ais), ≈ base samples (reverse_ais)
    acceptance: float  # mean acceptance rate of the transitions
    nfe: int  # batched evaluations of the target energy and its gradient


class _Path:
    """The bridge ``E_b = (1 - b) E_q + b E`` as the moves evaluate it: state (E_b, grad E_b, E, E_q, grad E, grad E_q)."""

    def __init__(self, target: Target, base: GaussianBase):
        self.target, self.base, self.beta = target, base, 0.0

    def combine(self, state: tuple) -> tuple:
        b, (e, eq, g, gq) = self.beta, state[2:]
        return ((1 - b) * eq + b * e, (1 - b) * gq + b * g, e, eq, g, gq)

    def __call__(self, x: Tensor) -> tuple:
        e, g = self.target(x)
        eq, gq = energy_and_grad(self.base.energy, x)
        return self.combine((None, None, e, eq, g, gq))

    def log_weight_increment(self, state: tuple, beta: float) -> Tensor:
        """``log f_beta(x) - log f_self.beta(x) = -(beta - self.beta) (E - E_q)(x)`` [B] float64 (x's state)."""
        return -(beta - self.beta) * (state[2] - state[3]).to(torch.float64)

    def move(self, x: Tensor, state: tuple, transition: str, eps: Tensor, leapfrog_steps: int,
             generator: torch.Generator | None) -> tuple[Tensor, tuple, Tensor]:
        """One MALA (noise std ``eps`` [B]) or HMC (``leapfrog_steps`` of size ``eps``) move leaving
        ``f_self.beta`` invariant: (x, state, accepted [B])."""
        if transition == "mala":
            return langevin_move(self, x, state, eps**2 / 2, eps, per_sample(1.0, x), True, generator)
        return hmc_move(self, x, state, eps, leapfrog_steps, per_sample(1.0, x), generator)


def _check_transition(transition: str, step_size: float, steps_per_beta: int) -> None:
    if transition not in ("mala", "hmc"):
        raise ValueError(f"transition must be 'mala' or 'hmc', got {transition!r}")
    _check_positive(step_size, "step_size")
    _check_steps(steps_per_beta, "steps_per_beta")


def _betas(betas: int | Sequence[float] | Tensor) -> list[float]:
    if isinstance(betas, int):
        return sigmoid_betas(betas).tolist()
    values = [float(b) for b in betas]
    if len(values) < 2 or values[0] != 0.0 or values[-1] != 1.0 or any(a >= b for a, b in zip(values, values[1:])):
        raise ValueError(f"betas must increase strictly from 0 to 1, or be a number of steps; got {values[:4]}...")
    return values


def _anneal(energy: Energy, base: GaussianBase, x: Tensor, betas: list[float], step_size: float, transition: str,
            steps_per_beta: int, leapfrog_steps: int, grad_clip: float | None,
            generator: torch.Generator | None) -> tuple[Tensor, Tensor, float, int]:
    """Run x through the bridges at ``betas`` (either direction): ``log_w += -(b_t - b_{t-1}) (E - E_q)(x)``,
    then the transitions at b_t for every t but the last. Returns (log_w [N] float64, x, acceptance, nfe)."""
    _check_transition(transition, step_size, steps_per_beta)
    path = _Path(Target(energy, grad_clip), base)
    x = x.detach()
    path.beta = betas[0]
    state = path(x)
    log_w = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    accepted, moves = torch.zeros_like(log_w), 0
    eps = per_sample(step_size, x)
    for t in range(1, len(betas)):
        log_w += path.log_weight_increment(state, betas[t])
        if t == len(betas) - 1:
            break
        path.beta = betas[t]
        state = path.combine(state)
        for _ in range(steps_per_beta):
            x, state, acc = path.move(x, state, transition, eps, leapfrog_steps, generator)
            accepted += acc.to(torch.float64)
            moves += 1
    acceptance = float(accepted.mean() / moves) if moves else 1.0
    return log_w, x, acceptance, path.target.nfe


def ais(energy: Energy, base: GaussianBase, num_chains: int, *, step_size: float, betas: int | Sequence[float] = 1000,
        transition: Transition = "mala", steps_per_beta: int = 1, leapfrog_steps: int = 10,
        grad_clip: float | None = None, generator: torch.Generator | None = None) -> AISResult:
    """Forward AIS estimate of ``log Z = log ∫ exp(-E(x)) dx`` (nats) from ``num_chains`` chains started
    at samples of ``base`` (see the module docstring for the path and the weights).

    ``betas``: the schedule from 0 to 1, or a number of steps T for :func:`sigmoid_betas` (T evaluations
    of E per transition step). ``transition``: ``mala`` (step ``step_size``, the noise std of the
    proposal) or ``hmc`` (``leapfrog_steps`` leapfrog steps of size ``step_size``), ``steps_per_beta``
    of them at each intermediate b. The estimate is a stochastic lower bound: ``E[log_z] <= log Z``.
    Returns :class:`AISResult`.
    """
    if not (isinstance(num_chains, int) and num_chains >= 2):
        raise ValueError(f"num_chains must be an integer >= 2, got {num_chains!r}")
    x = base.sample(num_chains, generator)
    log_w, x, acceptance, nfe = _anneal(energy, base, x, _betas(betas), step_size, transition, steps_per_beta,
                                        leapfrog_steps, grad_clip, generator)
    return AISResult(float(log_mean_exp(log_w, dim=-1)), log_mean_stderr(log_w), effective_sample_size(log_w), log_w,
                     x, acceptance, nfe)


def reverse_ais(energy: Energy, base: GaussianBase, x: Tensor, *, step_size: float,
                betas: int | Sequence[float] = 1000, transition: Transition = "mala", steps_per_beta: int = 1,
                leapfrog_steps: int = 10, grad_clip: float | None = None,
                generator: torch.Generator | None = None) -> AISResult:
    """Reverse AIS, the upper half of bidirectional Monte Carlo (BDMC, Grosse et al. 2015): the path of
    :func:`ais` run from b = 1 back to 0, starting at ``x`` [N, ...], which must be *exact* samples of
    exp(-E) / Z. Its weights ``w_rev = prod_t f_{b_{t-1}}(x) / f_{b_t}(x)`` have ``E[w_rev] = 1 / Z``,
    so ``log_z = -log mean w_rev`` is a stochastic upper bound: ``E[log_z] >= log Z``. With the same
    schedule and transitions, the gap to :func:`ais` bounds the error of both. Returns :class:`AISResult`.
    """
    if x.shape[0] < 2:
        raise ValueError(f"reverse_ais needs at least 2 exact target samples, got {x.shape[0]}")
    log_w, x, acceptance, nfe = _anneal(energy, base, x, _betas(betas)[::-1], step_size, transition, steps_per_beta,
                                        leapfrog_steps, grad_clip, generator)
    return AISResult(-float(log_mean_exp(log_w, dim=-1)), log_mean_stderr(log_w), effective_sample_size(log_w), log_w,
                     x, acceptance, nfe)


__all__ = ["AISResult", "GaussianBase", "Transition", "ais", "effective_sample_size", "gaussian_base",
           "log_mean_exp", "log_mean_stderr", "reverse_ais", "sigmoid_betas"]
