"""Variational bounds of discrete diffusion, per sample in nats, and importance sampling of t.

The discrete-time bound (D3PM eq. 1, Hoogeboom et al. 2021 eq. 14), exact in its sum over t:

    -log p(x0) <= KL(q(x_T | x0) || p(x_T)) + sum_{t=2}^T E_q KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))
                  + E_q[-log p(x0 | x_1)],

each expectation over ``x_t ~ q(x_t | x0)`` estimated with one draw per t by default (the KLs are analytic),
so the per-sample value is an unbiased estimate of the bound, not the bound itself (``draws`` more per t
narrow it). The continuous-time masked ELBO (MDLM eq. 10, MD4 eq. 5) of :class:`~.processes.AbsorbingDiffusion`:

    -log p(x0) <= E_{t ~ U(0, 1], x_t} [-alpha'(t) / (1 - alpha(t)) sum_{i: x_t,i = mask} -log p(x0_i | x_t)].

A denoiser is ``denoiser(x_t, t) -> logits [B, *dims, K]`` with ``t`` the time fraction [B] in [0, 1].
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from lightning_diffusion.discrete.processes import AbsorbingDiffusion, CategoricalProcess, log_onehot
from lightning_diffusion.errors import OptionError

Denoiser = Callable[[Tensor, Tensor], Tensor]


def _per_sample(values: Tensor) -> Tensor:
    """Sum over every dimension but the batch: [B, ...] -> [B]."""
    return values.flatten(1).sum(1)


def categorical_kl(log_q: Tensor, log_p: Tensor) -> Tensor:
    """``KL(q || p) = sum_s q(s) (log q(s) - log p(s))`` over the last dimension, in nats; 0 where q = 0."""
    return (log_q.exp() * (log_q - log_p)).sum(-1)


def x0_cross_entropy(x0: Tensor, logits: Tensor, where: Tensor | None = None) -> Tensor:
    """``sum_i -log softmax(logits)_i[x0_i]`` per sample [B] in nats, over the positions ``where`` is True
    (all by default): the auxiliary loss of D3PM's hybrid objective (``L_vlb + lambda`` this, eq. 5)."""
    log_p = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    nll = -log_p.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    return _per_sample(nll if where is None else nll * where)


def kl_term(process: CategoricalProcess, x0: Tensor, x_t: Tensor, t: Tensor, logits: Tensor) -> Tensor:
    """The bound's term ``L_{t-1}`` per sample [B] in nats, for integer steps ``t`` [B] in 1..T:
    ``KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))`` summed over positions; at t = 1 the true posterior is
    the point mass on x0 and the KL is the decoder term ``-log p(x0 | x_1)``, so one formula serves all t."""
    t = torch.as_tensor(t, device=x0.device)
    true = process.log_posterior(x_t, t, t - 1, log_onehot(x0, process.num_categories, logits.dtype))
    return _per_sample(categorical_kl(true, process.log_posterior(x_t, t, t - 1, logits)))


def prior_kl(process: CategoricalProcess, x0: Tensor) -> Tensor:
    """``KL(q(x_T | x0) || p(x_T))`` per sample [B] in nats (T = 1 in continuous time)."""
    return _per_sample(categorical_kl(process.log_q_xt_given_x0(x0, process.timesteps or 1.0), process.log_prior()))


def variational_bound(process: CategoricalProcess, denoiser: Denoiser, x0: Tensor, *,
                      generator: torch.Generator | None = None, chunk: int = 16, draws: int = 1) -> dict[str, Tensor]:
    """An unbiased estimate of the full discrete-time bound on ``-log p(x0)`` per sample, in nats: every t
    of 1..T, each term's expectation over ``x_t ~ q(x_t | x0)`` averaged over ``draws`` draws.

    The sum over t is exact; the draws of x_t make the per-sample number scatter around the bound (its
    mean over draws is the bound): more ``draws`` shrink that scatter as ``1 / sqrt(draws)`` at ``draws``
    times the cost. ``chunk`` timesteps go through the denoiser together (rows ``chunk * B``, row
    ``j * B + b`` the j-th timestep of sample b: a denoiser with per-sample labels repeats them whole), so
    memory is bounded. Returns ``prior`` [B], ``diffusion`` (sum of KL_t, t = 2..T) [B], ``decoder``
    (-log p(x0 | x1)) [B], ``steps`` [B, T] (column t-1 holds L_{t-1}: decoder first) and ``total`` [B] =
    prior + diffusion + decoder.
    """
    if process.continuous:
        raise OptionError("process", process, "has no steps to sum over", "use masked_elbo in continuous time")
    if chunk < 1:
        raise OptionError("chunk", chunk, "must be a positive integer")
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise OptionError("draws", draws, "must be a positive integer")
    total_steps = 0
    for _ in range(draws):  # one pass over every t per draw: draws = 1 draws exactly what it always did
        steps = []
        for ts in torch.arange(1, process.timesteps + 1, device=x0.device).split(chunk):
            t = ts.repeat_interleave(x0.shape[0])
            x0_rows = x0.repeat(len(ts), *([1] * (x0.dim() - 1)))
            x_t = process.sample_xt(x0_rows, t, generator)
            logits = denoiser(x_t, process.fraction(t).to(torch.get_default_dtype()))
            steps.append(kl_term(process, x0_rows, x_t, t, logits).view(len(ts), x0.shape[0]))
        total_steps = total_steps + torch.cat(steps).T
    steps = total_steps / draws if draws > 1 else total_steps
    prior = prior_kl(process, x0).to(steps.dtype)
    return {"prior": prior, "diffusion": steps[:, 1:].sum(1), "decoder": steps[:, 0], "steps": steps,
            "total": prior + steps.sum(1)}


def _check_masked(process: CategoricalProcess) -> None:
    if not (isinstance(process, AbsorbingDiffusion) and process.continuous):
        raise OptionError("process", process, "the masked ELBO needs AbsorbingDiffusion in continuous time",
                          "pass timesteps=None")


def masked_elbo(process: AbsorbingDiffusion, denoiser: Denoiser, x0: Tensor, *,
                t: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """One-draw estimate [B] in nats of the continuous-time masked bound on ``-log p(x0)`` (module docstring):
    ``t ~ U(0, 1]`` per sample (or the given ``t`` [B]), ``x_t ~ q(x_t | x0)``, the cross-entropy of the masked
    positions weighted by ``-alpha'(t) / (1 - alpha(t))`` (``1 / t`` for the linear schedule)."""
    _check_masked(process)
    if t is None:
        t = 1 - torch.rand(x0.shape[0], generator=generator, device=x0.device, dtype=torch.float64)
    x_t = process.sample_xt(x0, t, generator)
    logits = denoiser(x_t, t.to(torch.get_default_dtype()))
    weight = process.alpha_bar_rate(t).to(x0.device, torch.float32)
    return weight * x0_cross_entropy(x0, logits, where=x_t == process.mask_index)


def masked_elbo_exact(process: AbsorbingDiffusion, denoiser: Denoiser, x0: Tensor, *, t: float = 0.5) -> Tensor:
    """The masked bound [B] in nats, integrated exactly over t and x_t by enumerating the 2^L masks of the
    L positions of each sample (so for small L only: the tests' ground truth).

    For a denoiser that does not depend on t (the exact conditionals of absorbing diffusion do not: it is
    called at the time fraction ``t``), substituting ``a = alpha(t)`` gives, for any schedule,

        bound = sum_M B(|M|, L - |M| + 1) sum_{i in M} -log p(x0_i | x0 outside M),

    the any-order autoregressive form (Hoogeboom et al. 2022, ARDM), equal to ``-log p(x0)`` for the exact
    conditionals (Beta function ``B(m, L-m+1) = (m-1)! (L-m)! / L!``).
    """
    _check_masked(process)
    flat, L = x0.flatten(1), x0[0].numel()
    masks = ((torch.arange(1, 2**L, device=x0.device)[:, None] >> torch.arange(L, device=x0.device)) & 1).bool()
    m = masks.sum(1)
    log_beta = torch.lgamma(m.double()) + torch.lgamma((L - m + 1).double()) - math.lgamma(L + 1)
    rows = torch.where(masks[None], process.mask_index, flat[:, None]).reshape(-1, *x0.shape[1:])  # [B * (2^L - 1)]
    x0_rows = flat.repeat_interleave(len(masks), 0).view_as(rows)
    logits = denoiser(rows, torch.full((len(rows),), t, dtype=torch.get_default_dtype(), device=x0.device))
    ce = x0_cross_entropy(x0_rows, logits, where=rows == process.mask_index).view(x0.shape[0], len(masks))
    return (ce.double() * log_beta.exp()).sum(1)


class TimestepSampler(nn.Module):
    """Importance sampling of t in 1..T by the bound's terms (Nichol & Dhariwal 2021 sec. 3.3; Hoogeboom et al.
    2021): ``p_t ∝ sqrt(E[L_t^2])`` over the last ``history`` values of each t, mixed with ``uniform_fraction``
    of the uniform distribution; uniform until every t has ``history`` values. The history is kept in
    buffers, so it is saved in checkpoints. An unbiased estimate of ``sum_t L_t`` is ``L_t / p_t``.
    """

    def __init__(self, timesteps: int, history: int = 10, uniform_fraction: float = 1e-4):
        super().__init__()
        if timesteps < 1 or history < 1 or not 0 <= uniform_fraction <= 1:
            raise OptionError("TimestepSampler", (timesteps, history, uniform_fraction),
                              "needs timesteps >= 1, history >= 1 and uniform_fraction in [0, 1]")
        self.timesteps, self.history, self.uniform_fraction = timesteps, history, uniform_fraction
        self.register_buffer("loss_squared", torch.zeros(timesteps, history, dtype=torch.float64))
        self.register_buffer("count", torch.zeros(timesteps, dtype=torch.long))

    def probabilities(self) -> Tensor:
        """``p_t`` for t = 1..T, [T] float64."""
        uniform = torch.full((self.timesteps,), 1 / self.timesteps, dtype=torch.float64, device=self.count.device)
        if bool((self.count < self.history).any()):
            return uniform
        weights = self.loss_squared.mean(1).sqrt()
        return (1 - self.uniform_fraction) * weights / weights.sum() + self.uniform_fraction * uniform

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``(t, p_t)``: int64 steps [batch_size] in 1..T and their probabilities [batch_size] (float64)."""
        probs = self.probabilities()
        index = torch.multinomial(probs, batch_size, replacement=True, generator=generator)
        return index + 1, probs[index]

    @torch.no_grad()
    def update(self, t: Tensor, losses: Tensor) -> None:
        """Record the terms ``losses`` [B] (nats) at steps ``t`` [B] in 1..T into each step's ring buffer."""
        for step, loss in zip((t - 1).tolist(), losses.detach().double().tolist()):
            self.loss_squared[step, self.count[step] % self.history] = loss**2
            self.count[step] += 1
