"""Samplers over a ladder: annealed Langevin over noise levels, simulated annealing over
temperatures, and parallel tempering (replica exchange).

Ladders are explicit sequences (:func:`geometric_ladder` builds the usual ones), so a model's config
can name them by their ends and length. The moves are those of :mod:`.kernels`.
"""

# No `from __future__ import annotations`: the NamedTuple's fields must be evaluated types (pdoc).
import math
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from lightning_diffusion.mcmc.kernels import Chains, Energy, MCMCResult, Target, _check_positive, _check_steps, per_sample

NoiseEnergy = Callable[[Tensor, Tensor], Tensor]
"""``energy(x [B, ...], sigma [B]) -> E [B]``: a noise-conditional energy, ∝ -log p_sigma(x)."""


def geometric_ladder(first: float, last: float, num: int) -> list[float]:
    """``num`` values from ``first`` to ``last`` in a constant ratio ``(last / first)^(1 / (num - 1))``."""
    if num < 1 or first <= 0 or last <= 0:
        raise ValueError(f"a geometric ladder needs num >= 1 and positive ends, got ({first}, {last}, {num})")
    if num == 1:
        return [float(first)]
    return [first * (last / first) ** (i / (num - 1)) for i in range(num)]


def _check_ladder(values: Sequence[float], name: str, decreasing: bool) -> list[float]:
    values = [float(v) for v in values]
    pairs = list(zip(values, values[1:]))
    if not values or any(v <= 0 for v in values) or any((a <= b) if decreasing else (a >= b) for a, b in pairs):
        raise ValueError(f"{name} must be positive and strictly {'de' if decreasing else 'in'}creasing, got {values}")
    return values


def annealed_langevin(energy: NoiseEnergy, x: Tensor, sigmas: Sequence[float], *, eps: float = 2e-5,
                      steps_per_sigma: int = 100, metropolis: bool = False, final_denoise: bool = False,
                      grad_clip: float | None = None, generator: torch.Generator | None = None) -> MCMCResult:
    """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1) on a noise-conditional energy.

    For each ``sigma_i`` of the decreasing ladder ``sigmas``, ``steps_per_sigma`` (T) steps of
    ``x <- x - (alpha_i / 2) grad E(x, sigma_i) + sqrt(alpha_i) z`` with
    ``alpha_i = eps * sigma_i^2 / sigma_L^2`` (so ``grad E = -score``). Defaults are the paper's
    (eps = 2e-5, T = 100; its ladder is ``geometric_ladder(1, 0.01, 10)``). ``metropolis`` adds MALA's
    test at each level; ``final_denoise`` ends with Tweedie's step ``x <- x - sigma_L^2 grad E(x,
    sigma_L)`` (Jolicoeur-Martineau et al. 2021). ``energy`` gets sigma as a [B] tensor.
    Returns :class:`MCMCResult` (``energy`` at sigma_L).
    """
    sigmas = _check_ladder(sigmas, "sigmas", decreasing=True)
    _check_steps(steps_per_sigma, "steps_per_sigma")
    _check_positive(eps, "eps")

    def at(sigma: float) -> Energy:
        return lambda y: energy(y, per_sample(sigma, y))

    chains = Chains(Target(at(sigmas[0]), grad_clip), x)
    one = per_sample(1.0, x)
    for i, sigma in enumerate(sigmas):
        if i:
            chains.set_energy(at(sigma))
        alpha = eps * sigma**2 / sigmas[-1] ** 2
        chains.langevin(steps_per_sigma, math.sqrt(alpha) * one, one, metropolis, generator)
    if final_denoise:
        chains.x = chains.x - sigmas[-1] ** 2 * chains.state[1]
        chains.state = chains.target(chains.x)
    return chains.result()


def simulated_annealing(energy: Energy, x: Tensor, temperatures: Sequence[float], *, step_size: float,
                        steps_per_temperature: int = 10, metropolis: bool = True, scale_step: bool = True,
                        grad_clip: float | None = None, generator: torch.Generator | None = None) -> MCMCResult:
    """Simulated annealing (Kirkpatrick et al. 1983) with Langevin moves: for each T of the decreasing
    ladder ``temperatures`` (e.g. ``geometric_ladder(10, 1, 10)``; end below 1 to optimise),
    ``steps_per_temperature`` MALA (``metropolis``) or ULA moves on exp(-E / T).

    With ``scale_step`` the step at T is ``step_size * sqrt(T)``: the proposal keeps its size
    relative to the tempered modes (width ∝ sqrt(T)). The output is a sample of exp(-E / T_last) only
    as far as the chains equilibrated at each level. Returns :class:`MCMCResult`.
    """
    temperatures = _check_ladder(temperatures, "temperatures", decreasing=True)
    _check_steps(steps_per_temperature, "steps_per_temperature")
    _check_positive(step_size, "step_size")
    chains = Chains(Target(energy, grad_clip), x)
    one = per_sample(1.0, x)
    for t in temperatures:
        eps = step_size * math.sqrt(t) if scale_step else step_size
        chains.langevin(steps_per_temperature, eps * one, t * one, metropolis, generator)
    return chains.result()


class TemperingResult(NamedTuple):
    """What :func:`parallel_tempering` returns."""

    x: Tensor  # the T = 1 replica's final states [B, ...]: the samples
    energy: Tensor  # E at them [B]
    acceptance: Tensor  # Metropolis acceptance rate of the moves per temperature [K]
    swap_rate: Tensor  # accepted / proposed swaps per neighbour pair (T_k, T_k+1) [K - 1]
    grad_norm: float  # mean per-sample ||grad E|| over every evaluation, before clipping
    nfe: int  # batched energy-and-gradient evaluations (each on all K * B states)
    replicas: Tensor  # every replica's final states [K, B, ...]; replicas[0] is x (continue from here)


def swap_log_ratio(energy_cold: Tensor, energy_hot: Tensor, t_cold: float | Tensor, t_hot: float | Tensor) -> Tensor:
    """Log acceptance ratio of exchanging the states of two replicas at T_cold < T_hot:
    ``(1 / T_cold - 1 / T_hot) (E(x_cold) - E(x_hot))``; accepted with probability min(1, exp(.))."""
    return (1.0 / t_cold - 1.0 / t_hot) * (energy_cold - energy_hot)


def parallel_tempering(energy: Energy, x: Tensor, temperatures: Sequence[float], *, step_size: float | Sequence[float],
                       steps: int = 1000, moves_per_swap: int = 1, metropolis: bool = True,
                       grad_clip: float | None = None, generator: torch.Generator | None = None) -> TemperingResult:
    """Parallel tempering / replica exchange (Swendsen & Wang 1986; Geyer 1991) with Langevin moves.

    ``x`` [K, B, ...]: the initial states of B independent systems, each of K replicas at the
    increasing ``temperatures`` ``T_1 = 1 < ... < T_K`` (``geometric_ladder(1, T_K, K)``; start them
    all at one point with ``x0.expand(K, *x0.shape)``). Each of ``steps`` rounds makes
    ``moves_per_swap`` MALA (``metropolis``) or ULA moves on exp(-E / T_k) in every replica, then
    proposes to swap the states of the neighbours (k, k+1) for even k in even rounds and odd k in odd
    rounds, each accepted with probability ``min(1, exp((1/T_k - 1/T_k+1)(E(x_k) - E(x_k+1))))``
    (:func:`swap_log_ratio`), which keeps the product of the tempered laws invariant. The T = 1
    replica's states are the samples of exp(-E).

    ``step_size``: a float eps scaled to ``eps sqrt(T_k)`` at each temperature, or one step per
    temperature. Returns :class:`TemperingResult` with the swap rate of every neighbour pair.
    """
    temperatures = _check_ladder(temperatures, "temperatures", decreasing=False)
    num = len(temperatures)
    if temperatures[0] != 1.0:
        raise ValueError(f"temperatures must start at T_1 = 1 (the chain whose samples are returned), got {temperatures}")
    if x.dim() < 2 or x.shape[0] != num:
        raise ValueError(f"x must hold the initial states of every replica, shape [K={num}, B, ...]; got {list(x.shape)}")
    _check_steps(steps)
    _check_steps(moves_per_swap, "moves_per_swap")
    if isinstance(step_size, (int, float)):
        steps_k = [step_size * math.sqrt(t) for t in temperatures]
    else:
        steps_k = [float(s) for s in step_size]
        if len(steps_k) != num:
            raise ValueError(f"step_size must be a float or one step per temperature ({num}), got {len(steps_k)}")
    _check_positive(torch.tensor(steps_k), "step_size")
    batch = x.shape[1]
    flat = x.reshape(num * batch, *x.shape[2:])
    t_ladder = torch.tensor(temperatures, dtype=x.dtype, device=x.device)
    t_flat = t_ladder.repeat_interleave(batch)
    eps_flat = torch.tensor(steps_k, dtype=x.dtype, device=x.device).repeat_interleave(batch)
    chains = Chains(Target(energy, grad_clip), flat)
    swaps_accepted = torch.zeros(max(num - 1, 0), dtype=x.dtype, device=x.device)
    swaps_proposed = torch.zeros_like(swaps_accepted)
    rows = torch.arange(num, device=x.device)[:, None].expand(num, batch)
    for round_index in range(steps):
        chains.langevin(moves_per_swap, eps_flat, t_flat, metropolis, generator)
        cold = torch.arange(round_index % 2, num - 1, 2, device=x.device)
        if cold.numel() == 0:
            continue
        e = chains.state[0].reshape(num, batch)
        log_r = swap_log_ratio(e[cold], e[cold + 1], t_ladder[cold, None], t_ladder[cold + 1, None])
        u = torch.rand(log_r.shape, generator=generator, dtype=x.dtype, device=x.device)
        accept = u.log() < log_r  # [pairs, B]
        swaps_accepted[cold] += accept.to(x.dtype).mean(1)
        swaps_proposed[cold] += 1
        source = rows.clone()  # replica k takes the state of replica source[k, b]
        source[cold] = torch.where(accept, cold[:, None] + 1, source[cold])
        source[cold + 1] = torch.where(accept, cold[:, None], source[cold + 1])
        index = (source * batch + torch.arange(batch, device=x.device)).reshape(-1)
        chains.x = chains.x[index]
        chains.state = tuple(s[index] for s in chains.state)
    replicas = chains.x.reshape(x.shape)
    acceptance = chains.acceptance_per_chain().reshape(num, batch).mean(1)
    return TemperingResult(replicas[0], chains.state[0][:batch], acceptance,
                           swaps_accepted / swaps_proposed.clamp_min(1), chains.target.grad_norm, chains.target.nfe,
                           replicas)


__all__ = ["NoiseEnergy", "TemperingResult", "annealed_langevin", "geometric_ladder", "parallel_tempering",
           "simulated_annealing", "swap_log_ratio"]
