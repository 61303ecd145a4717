"""MCMC on an energy: Langevin (ULA), Metropolis-adjusted Langevin (MALA), Hamiltonian Monte Carlo,
and the decoupled Langevin update of the EBM codes.

The target is ``p_T(x) ∝ exp(-E(x) / T)`` for any ``energy(x) -> Tensor[B]`` (E in nats at T = 1)
and any data shape ``[B, ...]``: per-sample quantities (temperature, step, norms) broadcast over
all data dimensions, and norms flatten them. ``grad E`` is taken by autograd with respect to x only
(the parameters of an energy net get no ``.grad``), also under ``torch.no_grad``, so a model can
call these in evaluation. Every random draw uses the given ``torch.Generator`` (on x's device).

Every sampler returns :class:`MCMCResult` ``(x, energy, acceptance, grad_norm, nfe)``.
"""

# No `from __future__ import annotations`: the NamedTuple's fields must be evaluated types (pdoc).
from typing import Callable, NamedTuple

import torch
from torch import Tensor

Energy = Callable[[Tensor], Tensor]
"""``energy(x [B, ...]) -> E [B]``: the density is ∝ exp(-E(x)), E in nats."""


class MCMCResult(NamedTuple):
    """What every sampler of :mod:`lightning_diffusion.mcmc` returns."""

    x: Tensor  # the chains' final states, shaped like the initial x [B, ...]
    energy: Tensor  # E(x) at them [B] (untempered: E, not E / T)
    acceptance: float  # Metropolis acceptance rate, mean over chains and moves (1.0 for unadjusted moves)
    grad_norm: float  # mean per-sample ||grad E|| over every gradient evaluation, before clipping
    nfe: int  # batched energy-and-gradient evaluations


# -- shared helpers -------------------------------------------------------------------------------
def energy_and_grad(energy: Energy, x: Tensor) -> tuple[Tensor, Tensor]:
    """``E(x)`` [B] and ``grad_x E(x)`` [B, ...], detached; autograd is on even under ``torch.no_grad``.

    Raises ValueError if ``energy`` does not return one value per sample.
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        e = energy(x)
        if e.shape != x.shape[:1]:
            raise ValueError(f"energy(x) must return one energy per sample, shape [{x.shape[0]}]; it returned "
                             f"shape {list(e.shape)} for x of shape {list(x.shape)}")
        (g,) = torch.autograd.grad(e.sum(), x)
    return e.detach(), g.detach()


def per_sample(value: float | Tensor, x: Tensor) -> Tensor:
    """A scalar or a [B] tensor as a [B] tensor in x's dtype and device."""
    return torch.as_tensor(value, dtype=x.dtype, device=x.device).expand(x.shape[0])


def _bc(v: Tensor, x: Tensor) -> Tensor:
    """A per-sample [B] tensor reshaped [B, 1, ..., 1] to broadcast over x's data dimensions."""
    return v.reshape(v.shape + (1,) * (x.dim() - v.dim()))


def _sq_norm(v: Tensor) -> Tensor:
    """Per-sample squared norm [B] over all data dimensions."""
    return v.flatten(1).pow(2).sum(1)


def _uniform(like: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.rand(like.shape, generator=generator, dtype=like.dtype, device=like.device)


def _normal(like: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)


class Target:
    """``energy`` as the moves use it: ``self(x) -> (E, grad E)`` with the per-sample gradient norm
    clipped to ``grad_clip`` (None: not clipped), counting evaluations (``nfe``) and the mean
    unclipped gradient norm. ``energy`` may be replaced between moves (annealing); the counts go on.

    Clipping makes the drift a different (still deterministic) function of x; a Metropolis step that
    uses the same clipped drift in both proposal densities stays exact.
    """

    def __init__(self, energy: Energy, grad_clip: float | None = None):
        if grad_clip is not None and not grad_clip > 0:
            raise ValueError(f"grad_clip must be a positive norm or None, got {grad_clip}")
        self.energy, self.grad_clip = energy, grad_clip
        self.nfe, self._norm_sum, self._norm_count = 0, 0.0, 0

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor]:
        e, g = energy_and_grad(self.energy, x)
        norm = g.flatten(1).norm(dim=1)
        self.nfe += 1
        self._norm_sum, self._norm_count = self._norm_sum + norm.sum(), self._norm_count + norm.numel()
        if self.grad_clip is not None:
            g = g * _bc((self.grad_clip / norm.clamp_min(1e-30)).clamp(max=1.0), g)
        return e, g

    @property
    def grad_norm(self) -> float:
        return float(self._norm_sum / max(self._norm_count, 1))


# -- one move -------------------------------------------------------------------------------------
# A state is (e, g, *aux): the energy [B] and (clipped) gradient at x under the current target, and
# anything else the caller's evaluate returns (AIS keeps the base and target parts); a rejected
# proposal keeps every entry of the old state.
def _keep(accept: Tensor, new: Tensor, old: Tensor) -> Tensor:
    return torch.where(_bc(accept, new), new, old)


def langevin_move(evaluate: Callable, x: Tensor, state: tuple, drift: Tensor, noise: Tensor, temperature: Tensor,
                  metropolis: bool, generator: torch.Generator | None,
                  clamp: tuple[float, float] | None = None) -> tuple[Tensor, tuple, Tensor]:
    """One proposal ``y = x - drift * g(x) + noise * xi`` (xi ~ N(0, I)), per-sample ``drift``,
    ``noise``, ``temperature`` [B]; with ``metropolis`` accepted with probability
    ``min(1, exp(-(e(y) - e(x)) / T) q(x | y) / q(y | x))``,
    ``log q(y | x) = -||y - x + drift g(x)||^2 / (2 noise^2) + const``.

    Returns (x, state, accepted [B] as 0/1 in x's dtype). ``clamp`` (unadjusted moves only) clamps y.
    """
    e, g = state[0], state[1]
    xi = _normal(x, generator)
    y = x - _bc(drift, x) * g + _bc(noise, x) * xi
    if clamp is not None:
        y = y.clamp(*clamp)
    new = evaluate(y)
    if not metropolis:
        return y, new, torch.ones_like(e)
    log_q_forward = -0.5 * _sq_norm(xi)
    log_q_backward = -_sq_norm(x - y + _bc(drift, x) * new[1]) / (2 * noise**2)
    log_alpha = (e - new[0]) / temperature + log_q_backward - log_q_forward
    accept = _uniform(e, generator).log() < log_alpha
    return _keep(accept, y, x), tuple(_keep(accept, n, o) for n, o in zip(new, state)), accept.to(x.dtype)


def hmc_move(evaluate: Callable, x: Tensor, state: tuple, step: Tensor, leapfrog_steps: int, temperature: Tensor,
             generator: torch.Generator | None) -> tuple[Tensor, tuple, Tensor]:
    """One HMC move for exp(-e / T) (Neal 2011): momentum ``p ~ N(0, I)``, ``leapfrog_steps`` leapfrog
    steps of per-sample size ``step`` [B] on ``H(x, p) = e(x) / T + ||p||^2 / 2``, accepted with
    probability ``min(1, exp(H(x, p) - H(x', p')))``. Costs ``leapfrog_steps`` evaluations.

    Returns (x, state, accepted [B]).
    """
    s = _bc(step, x)
    t = _bc(temperature, x)
    p = _normal(x, generator)
    h0 = state[0] / temperature + 0.5 * _sq_norm(p)
    y, new = x, state
    p_half = p - 0.5 * s * new[1] / t
    for i in range(leapfrog_steps):
        y = y + s * p_half
        new = evaluate(y)
        p_half = p_half - (s if i < leapfrog_steps - 1 else 0.5 * s) * new[1] / t
    h1 = new[0] / temperature + 0.5 * _sq_norm(p_half)
    accept = _uniform(h0, generator).log() < h0 - h1
    return _keep(accept, y, x), tuple(_keep(accept, n, o) for n, o in zip(new, state)), accept.to(x.dtype)


class Chains:
    """A batch of chains ``x`` [B, ...] on a :class:`Target`: the state, acceptance counts per chain,
    and the moves (Langevin, MALA, HMC) at a per-sample temperature."""

    def __init__(self, target: Target, x: Tensor):
        self.target, self.x = target, x.detach()
        self.state = target(self.x)
        self.accepted = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        self.moves = 0

    def set_energy(self, energy: Energy) -> None:
        """Move on to another energy (annealing): re-evaluates E and grad E at the current states."""
        self.target.energy = energy
        self.state = self.target(self.x)

    def langevin(self, steps: int, step_size: Tensor, temperature: Tensor, metropolis: bool,
                 generator: torch.Generator | None, clamp: tuple[float, float] | None = None) -> None:
        """``steps`` moves ``x <- x - (eps^2 / (2 T)) grad E + eps xi`` (eps = step_size [B], T [B])."""
        self.move(steps, step_size**2 / (2 * temperature), step_size, temperature, metropolis, generator, clamp)

    def move(self, steps: int, drift: Tensor, noise: Tensor, temperature: Tensor, metropolis: bool,
             generator: torch.Generator | None, clamp: tuple[float, float] | None = None) -> None:
        """``steps`` moves ``x <- x - drift grad E + noise xi`` (:func:`langevin_move`; drift, noise, T [B])."""
        for _ in range(steps):
            self.x, self.state, accepted = langevin_move(self.target, self.x, self.state, drift, noise, temperature,
                                                         metropolis, generator, clamp)
            self.accepted += accepted
            self.moves += 1

    def hmc(self, steps: int, step_size: Tensor, leapfrog_steps: int, temperature: Tensor,
            generator: torch.Generator | None) -> None:
        for _ in range(steps):
            self.x, self.state, accepted = hmc_move(self.target, self.x, self.state, step_size, leapfrog_steps,
                                                    temperature, generator)
            self.accepted += accepted
            self.moves += 1

    def acceptance_per_chain(self) -> Tensor:
        """Acceptance rate of each chain [B] (1 where no move was made)."""
        return self.accepted / self.moves if self.moves else torch.ones_like(self.accepted)

    def result(self) -> MCMCResult:
        return MCMCResult(self.x, self.state[0], float(self.acceptance_per_chain().mean()), self.target.grad_norm,
                          self.target.nfe)


def _check_steps(steps: int, name: str = "steps") -> None:
    if not (isinstance(steps, int) and steps >= 0):
        raise ValueError(f"{name} must be a non-negative integer, got {steps!r}")


def _check_positive(value: float | Tensor, name: str) -> None:
    if not bool((torch.as_tensor(value) > 0).all()):
        raise ValueError(f"{name} must be positive, got {value}")


# -- the samplers ---------------------------------------------------------------------------------
def langevin(energy: Energy, x: Tensor, *, step_size: float | Tensor, steps: int = 100,
             temperature: float | Tensor = 1.0, metropolis: bool = False, grad_clip: float | None = None,
             generator: torch.Generator | None = None) -> MCMCResult:
    """Unadjusted Langevin (ULA) on ``exp(-E(x) / T)``: ``steps`` times
    ``x <- x - (eps^2 / (2 T)) grad E(x) + eps xi``, ``xi ~ N(0, I)``.

    ``eps = step_size`` is the noise std per step in data units (the discretised Langevin diffusion
    runs for time eps^2 / 2 per step); ULA's stationary law is exp(-E / T) up to a bias of order
    eps^2 (for a Gaussian of variance s^2, the variance s^2 / (1 - eps^2 / (4 s^2))).
    ``metropolis=True`` is :func:`mala`. ``step_size`` and ``temperature`` are scalars or per-chain [B];
    ``grad_clip`` clips each chain's ||grad E|| (None: off). Returns :class:`MCMCResult`.
    """
    _check_steps(steps)
    _check_positive(step_size, "step_size")
    _check_positive(temperature, "temperature")
    chains = Chains(Target(energy, grad_clip), x)
    chains.langevin(steps, per_sample(step_size, x), per_sample(temperature, x), metropolis, generator)
    return chains.result()


def mala(energy: Energy, x: Tensor, *, step_size: float | Tensor, steps: int = 100,
         temperature: float | Tensor = 1.0, grad_clip: float | None = None,
         generator: torch.Generator | None = None) -> MCMCResult:
    """Metropolis-adjusted Langevin (Roberts & Tweedie 1996) on ``exp(-E(x) / T)``: the proposal of
    :func:`langevin`, ``y = x - (eps^2 / (2 T)) grad E(x) + eps xi``, accepted with probability
    ``min(1, exp(-(E(y) - E(x)) / T) q(x | y) / q(y | x))``, ``q(y | x) = N(y; x - (eps^2 / (2T))
    grad E(x), eps^2 I)``. Leaves exp(-E / T) exactly invariant at any eps (with or without
    ``grad_clip``); ``acceptance`` says whether eps suits the target (about 0.57 is optimal in high
    dimension). Returns :class:`MCMCResult`.
    """
    return langevin(energy, x, step_size=step_size, steps=steps, temperature=temperature, metropolis=True,
                    grad_clip=grad_clip, generator=generator)


def hmc(energy: Energy, x: Tensor, *, step_size: float | Tensor, leapfrog_steps: int = 10, steps: int = 100,
        temperature: float | Tensor = 1.0, grad_clip: float | None = None,
        generator: torch.Generator | None = None) -> MCMCResult:
    """Hamiltonian Monte Carlo (Neal 2011) on ``exp(-E(x) / T)``: ``steps`` moves, each a fresh
    momentum, ``leapfrog_steps`` leapfrog steps of size ``step_size`` (data units) and a Metropolis
    test on the Hamiltonian ``E / T + ||p||^2 / 2``. NFE = steps * leapfrog_steps + 1.
    Returns :class:`MCMCResult`.
    """
    _check_steps(steps)
    if not (isinstance(leapfrog_steps, int) and leapfrog_steps >= 1):
        raise ValueError(f"leapfrog_steps must be a positive integer, got {leapfrog_steps!r}")
    _check_positive(step_size, "step_size")
    _check_positive(temperature, "temperature")
    chains = Chains(Target(energy, grad_clip), x)
    chains.hmc(steps, per_sample(step_size, x), leapfrog_steps, per_sample(temperature, x), generator)
    return chains.result()


def decoupled_langevin(energy: Energy, x: Tensor, *, step_size: float = 10.0, noise_std: float = 0.005,
                       steps: int = 60, grad_clip: float | None = None, clamp: tuple[float, float] | None = None,
                       generator: torch.Generator | None = None) -> MCMCResult:
    """The EBM codes' update (IGEBM, Du & Mordatch 2019; JEM, Grathwohl et al. 2020), for compatibility:
    ``steps`` times ``x <- x - step_size * grad E(x) + noise_std * xi``, then ``clamp`` (e.g. (-1, 1)).

    NOT a sampler of exp(-E): it is :func:`langevin` with ``eps = noise_std`` at the temperature
    ``T = noise_std^2 / (2 step_size)``, so its stationary law is exp(-E / T) (plus ULA's
    discretisation bias). At the defaults (IGEBM's step 10, noise 0.005) T = 1.25e-6: a noisy
    gradient descent into the modes of E. A model trained with it learns an E whose short-run chains
    from its initialisation give good samples, not an E whose Boltzmann density is the data's.
    Returns :class:`MCMCResult` (``acceptance`` = 1).
    """
    _check_steps(steps)
    _check_positive(step_size, "step_size")
    if not noise_std >= 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    chains = Chains(Target(energy, grad_clip), x)
    ones = per_sample(1.0, x)
    chains.move(steps, step_size * ones, noise_std * ones, ones, False, generator, clamp)
    return chains.result()


def decoupled_temperature(step_size: float, noise_std: float) -> float:
    """The temperature ``T = noise_std^2 / (2 step_size)`` whose exp(-E / T) the decoupled update samples."""
    return noise_std**2 / (2 * step_size)


__all__ = ["Energy", "MCMCResult", "decoupled_langevin", "decoupled_temperature", "energy_and_grad", "hmc",
           "langevin", "mala"]
