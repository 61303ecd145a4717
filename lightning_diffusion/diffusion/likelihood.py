"""Likelihood through the probability-flow ODE (Song et al. 2021, Sec. 4.3 and App. D.2).

The probability-flow ODE ``dx/dt = v(x, t) = f(t) x - g(t)^2 / 2 * score(x, t)`` moves data to
the prior with ``d log p_t(x_t) / dt = -div v(x_t, t)``, so

    log p_0(x) = log p_T(x_T) + int_{t_min}^{t_max} div v(x_t, t) dt.

The divergence is exact (a sum of D autograd passes; low-dimensional data) or Hutchinson's
unbiased estimate ``E[e^T (dv/dx) e]`` with one Rademacher or Gaussian probe e per solve;
``auto`` (:func:`resolve_divergence`) takes the exact one up to :data:`EXACT_DIVERGENCE_MAX_DIMS`
dimensions and Rademacher above.
For 8-bit images, :func:`~lightning_diffusion.likelihoods.bits.dequantize` and
:func:`~lightning_diffusion.likelihoods.bits.bits_per_dim_discrete` (in ``likelihoods``, importable from
here as before) give the numbers papers report (uniform dequantization, bits/dim of the discrete data).
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor

from lightning_diffusion.diffusion.schedules import append_dims
from lightning_diffusion.diffusion.sde import GaussianProcess
from lightning_diffusion.likelihoods.bits import bits_per_dim_discrete, dequantize  # noqa: F401 - as before

ScoreFn = Callable[[Tensor, Tensor], Tensor]
Divergence = Literal["auto", "exact", "rademacher", "gaussian"]

#: ``divergence="auto"`` is exact for data of at most this many dimensions, Hutchinson (Rademacher) above.
#: Cost: exact takes D vector-Jacobian products per ODE evaluation, Hutchinson one. Noise: one Hutchinson
#: probe per sample leaves each an error (Rademacher: variance 2 sum_{i != j} J_ij^2, integrated along the
#: path, Grathwohl et al. 2019 sec. 3.1) that exact does not have. The threshold is where exact's cost
#: outgrows the value of removing that noise; the measured costs and errors are in the README (ScoreSDE
#: likelihood) and benchmarks/results/cpu_divergence.json (``benchmarks/bench_divergence.py``).
EXACT_DIVERGENCE_MAX_DIMS = 16


def resolve_divergence(divergence: str, num_dims: int) -> str:
    """The divergence a solve uses: ``auto`` becomes ``exact`` for ``num_dims`` (elements of one
    sample) <= :data:`EXACT_DIVERGENCE_MAX_DIMS` and ``rademacher`` above; the others stay."""
    if divergence == "auto":
        return "exact" if num_dims <= EXACT_DIVERGENCE_MAX_DIMS else "rademacher"
    return divergence


def probability_flow_drift(score_fn: ScoreFn, process: GaussianProcess, x: Tensor, t: Tensor) -> Tensor:
    """``v(x, t) = f(t) x - g(t)^2 / 2 * score(x, t)`` for a batch x [B, ...] at times t [B]."""
    f = append_dims(process.f(t), x.ndim).to(x.dtype)
    g2 = append_dims(process.g2(t), x.ndim).to(x.dtype)
    return f * x - 0.5 * g2 * score_fn(x, t)


def ode_nll(
    score_fn: ScoreFn,
    process: GaussianProcess,
    x: Tensor,
    *,
    divergence: Divergence = "auto",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    steps: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, int]:
    """Negative log-likelihood ``-log p_0(x)`` in nats per sample [B], and the number of score evaluations.

    Args:
        score_fn: ``score(x_t, t)``, the model's score at time t (float tensor [B]).
        process: a :class:`~lightning_diffusion.diffusion.sde.GaussianProcess`; integrated from
            ``t_min`` to ``t_max``.
        x: data [B, ...] (already dequantized, for discrete data).
        divergence: ``exact`` (D backward passes per evaluation), a Hutchinson probe
            (``rademacher``, ``gaussian``), or ``auto`` (:func:`resolve_divergence` on D = ``x[0].numel()``).
        rtol, atol: tolerances of the adaptive solver.
        method: a torchdiffeq method; with ``steps`` a fixed grid (e.g. ``rk4``) is used, which
            runs the same number of evaluations on every rank (needed when the model is sharded).
        steps: number of fixed-grid steps; None for the adaptive solver.
        generator: draws the Hutchinson probe.
    """
    from torchdiffeq import odeint

    shape = x.shape
    batch = shape[0]
    divergence = resolve_divergence(divergence, x[0].numel())
    if divergence == "rademacher":
        probe = torch.randint(0, 2, shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1
    elif divergence == "gaussian":
        probe = torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)
    elif divergence != "exact":
        raise ValueError(f"unknown divergence {divergence!r}; choose auto, exact, rademacher or gaussian")
    nfe = 0

    def dynamics(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        nonlocal nfe
        nfe += 1
        xt = state[0]
        tt = torch.full((batch,), float(t), device=x.device, dtype=x.dtype)
        with torch.enable_grad():
            xt = xt.detach().requires_grad_(True)
            v = probability_flow_drift(score_fn, process, xt, tt)
            if divergence == "exact":
                flat = v.reshape(batch, -1)
                div = torch.zeros(batch, device=x.device, dtype=x.dtype)
                for i in range(flat.shape[1]):
                    (grad,) = torch.autograd.grad(flat[:, i].sum(), xt, retain_graph=i < flat.shape[1] - 1)
                    div = div + grad.reshape(batch, -1)[:, i]
            else:
                (grad,) = torch.autograd.grad((v * probe).sum(), xt)
                div = (grad * probe).reshape(batch, -1).sum(1)
        return v.detach(), div.detach()

    ts = torch.tensor([process.t_min, process.t_max], dtype=x.dtype, device=x.device)
    options = {}
    if steps is not None:
        options = {"step_size": (process.t_max - process.t_min) / steps}
        method = "rk4" if method == "dopri5" else method
    state0 = (x, torch.zeros(batch, device=x.device, dtype=x.dtype))
    xs, divs = odeint(dynamics, state0, ts, rtol=rtol, atol=atol, method=method, options=options)
    z, integral = xs[-1], divs[-1]
    return -(process.prior_logp(z) + integral), nfe
