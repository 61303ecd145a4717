"""Gaussian densities, KL divergences and the discretized Gaussian of 8-bit data: pure math, no Lightning.

Every value is elementwise and in nats unless a name says otherwise (``diagonal_gaussian_log_prob``
sums per sample). Data live in [-1, 1]; ``levels``-level data (8 bits: ``x = k / 127.5 - 1``) have
the bin ``[x - delta, x + delta]``, ``delta = 1 / (levels - 1)``, with the outermost bins open.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_diffusion.likelihoods.bits import sum_over_dims


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


def soft_clamp(x: Tensor, bound: float | None) -> Tensor:
    """``bound * tanh(x / bound)``: a smooth clamp to (-bound, bound) with slope 1 at 0 (NVAE's
    ``soft_clamp5``; Efficient-VDVAE). None returns ``x`` unchanged."""
    return x if bound is None else bound * torch.tanh(x / bound)


def diagonal_gaussian_sample(mean: Tensor, logvar: Tensor, generator: torch.Generator | None = None,
                             temperature: float = 1.0) -> Tensor:
    """``z = mean + temperature * exp(logvar / 2) * eps``, ``eps ~ N(0, I)`` (reparameterized;
    ``temperature`` < 1 samples a narrowed Gaussian, as NVAE/VDVAE do at generation)."""
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + temperature * torch.exp(0.5 * logvar) * eps


def diagonal_gaussian_log_prob(z: Tensor, mean: Tensor, logvar: Tensor) -> Tensor:
    """``log N(z; mean, diag(exp(logvar)))`` per sample [B], in nats (the elementwise density of
    :func:`gaussian_log_likelihood` summed over all but dim 0)."""
    return sum_over_dims(gaussian_log_likelihood(z, mean, 0.5 * logvar).expand_as(z))
