"""The variational bound of a DDPM (Ho et al. 2020, eq. 5; Nichol & Dhariwal 2021, sec. 2): Gaussian
KL divergences, decoder likelihoods and unit conversions.

    L_vlb = L_T + sum_{t=2}^{T} L_{t-1} + L_0,
    L_T     = KL(q(x_T | x_0) || N(0, I)),
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)),
    L_0     = -log p_theta(x_0 | x_1).

``-log p(x_0) <= E_q[L_vlb]``. In our step indices (``i = t - 1`` in [0, T)), step 0 carries the
decoder term L_0 and step i >= 1 the KL term L_i. All values are in nats unless a name says bits;
"per sample" values are summed over the data dimensions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_diffusion.diffusion.schedules import NoiseSchedule

LN2 = math.log(2.0)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """``KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)))`` elementwise, in nats:

    ``0.5 (logvar2 - logvar1 + exp(logvar1 - logvar2) + (mean1 - mean2)^2 exp(-logvar2) - 1)``.
    Arguments broadcast against each other.
    """
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2).pow(2) * torch.exp(-logvar2) - 1.0)


def gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """Log-density of continuous ``x`` under ``N(mean, exp(log_scale)^2)`` elementwise, in nats:

    ``-0.5 log(2 pi) - log_scale - 0.5 (x - mean)^2 exp(-2 log_scale)``.
    """
    return -0.5 * math.log(2 * math.pi) - log_scale - 0.5 * (x - mean).pow(2) * torch.exp(-2.0 * log_scale)


def _log_normal_interval(a: Tensor, b: Tensor) -> Tensor:
    """``log(Phi(b) - Phi(a))`` for ``a < b``, stable in both tails.

    By symmetry ``Phi(b) - Phi(a) = Phi(-a) - Phi(-b)``; the interval is reflected so that it lies
    mostly left of 0, where ``log Phi`` (``log_ndtr``) keeps full precision, and
    ``log(Phi(hi) - Phi(lo)) = log Phi(hi) + log(1 - exp(log Phi(lo) - log Phi(hi)))``.
    """
    flip = (a + b) > 0
    lo, hi = torch.where(flip, -b, a), torch.where(flip, -a, b)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    tiny = torch.finfo(log_hi.dtype).tiny
    return log_hi + torch.log((-torch.expm1(log_lo - log_hi)).clamp(min=tiny))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor, levels: int = 256) -> Tensor:
    """Log-probability of the bin of ``x`` under ``N(mean, exp(log_scale)^2)``, elementwise, in nats.

    ``x`` holds ``levels``-level data scaled to [-1, 1] (8 bits: ``x = k / 127.5 - 1``). Its bin is
    ``[x - delta, x + delta]`` with ``delta = 1 / (levels - 1)`` (half of the 2/255 spacing), and
    the outermost bins extend to -inf (``x = -1``) and +inf (``x = 1``) (Ho et al. 2020, eq. 13):

    ``log P(x) = log(Phi((x + delta - mean) / s) - Phi((x - delta - mean) / s))``, ``s = exp(log_scale)``;

    the probabilities of the ``levels`` bins sum to 1. Computed with ``log_ndtr`` (no tanh
    approximation of the CDF), stable far in the tails.
    """
    delta = 1.0 / (levels - 1)
    inv_scale = torch.exp(-log_scale)
    upper = (x + delta - mean) * inv_scale
    lower = (x - delta - mean) * inv_scale
    log_left = torch.special.log_ndtr(upper)  # bin (-inf, -1 + delta]
    log_right = torch.special.log_ndtr(-lower)  # bin [1 - delta, inf)
    log_mid = _log_normal_interval(lower, upper)
    edge = 1.0 - 0.5 * delta  # x on the grid is either beyond +-edge (outermost bins) or inside
    return torch.where(x < -edge, log_left, torch.where(x > edge, log_right, log_mid))


def sum_over_dims(x: Tensor) -> Tensor:
    """Sum over every dimension but the first: [B, ...] -> [B]."""
    return x.flatten(1).sum(1)


def nats_to_bits_per_dim(nats: Tensor, num_dims: int) -> Tensor:
    """``nats / (num_dims ln 2)``: a per-sample negative log-likelihood in bits per dimension."""
    return nats / (num_dims * LN2)


def prior_kl(schedule: NoiseSchedule, x0: Tensor) -> Tensor:
    """``L_T = KL(q(x_T | x_0) || N(0, I))`` per sample [B], in nats, with
    ``q(x_T | x_0) = N(sqrt(abar_T) x_0, (1 - abar_T) I)`` at the last step of ``schedule``."""
    t = torch.full((x0.shape[0],), schedule.timesteps - 1, device=x0.device, dtype=torch.long)
    abar = schedule.at("alphas_cumprod", t, x0)
    zero = torch.zeros((), dtype=x0.dtype, device=x0.device)
    return sum_over_dims(normal_kl(abar.sqrt() * x0, torch.log1p(-abar), zero, zero).expand_as(x0))


def vlb_terms(schedule: NoiseSchedule, x0: Tensor, x_t: Tensor, t: Tensor, model_mean: Tensor,
              model_log_variance: Tensor, discrete: bool) -> Tensor:
    """The bound's term at step ``t`` [B] for one draw ``x_t ~ q(x_t | x_0)``, per sample [B], in nats.

    Step ``t >= 1``: ``L_t = KL(q(x_{t-1} | x_t, x_0) || N(model_mean, exp(model_log_variance)))``.
    Step 0: the decoder ``L_0 = -log p(x_0 | x_1)`` with the same Gaussian: the probability of
    ``x_0``'s 8-bit bin (:func:`discretized_gaussian_log_likelihood`) for ``discrete`` data, the
    density (:func:`gaussian_log_likelihood`) otherwise.
    """
    true_mean = schedule.q_posterior_mean(x0, x_t, t)
    true_log_variance = schedule.at("posterior_log_variance_clipped", t, x_t)
    kl = sum_over_dims(normal_kl(true_mean, true_log_variance, model_mean, model_log_variance).expand_as(x0))
    log_scale = (0.5 * model_log_variance).expand_as(x0)
    decoder = discretized_gaussian_log_likelihood if discrete else gaussian_log_likelihood
    nll = -sum_over_dims(decoder(x0, model_mean, log_scale))
    return torch.where(t == 0, nll, kl)
