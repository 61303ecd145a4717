"""Units and estimators of a negative log-likelihood: nats to bits per dimension, the bin width and
uniform dequantization of 8-bit data, and the log-mean-exp of importance weights (IWAE, AIS).
Pure math, no Lightning.

IWAE (Burda et al. 2016): ``log p(x) >= E[log (1/K) sum_k w_k]``, ``w_k = p(x, z_k) / q(z_k | x)``;
:func:`log_mean_exp` and :class:`RunningLogMeanExp` evaluate the inner log-mean-exp, the latter
over chunks of k so that memory does not grow with K. AIS averages its weights the same way.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LN2 = math.log(2.0)


def sum_over_dims(x: Tensor) -> Tensor:
    """Sum over every dimension but the first: [B, ...] -> [B]."""
    return x.flatten(1).sum(1)


def nats_to_bits_per_dim(nats: Tensor, num_dims: int) -> Tensor:
    """``nats / (num_dims ln 2)``: a per-sample negative log-likelihood in bits per dimension."""
    return nats / (num_dims * LN2)


def log_mean_exp(x: Tensor, dim: int = 0) -> Tensor:
    """``log((1/K) sum_k exp(x_k))`` over ``dim`` of size K, stably: ``logsumexp(x) - log K``."""
    return torch.logsumexp(x, dim=dim) - math.log(x.shape[dim])


class RunningLogMeanExp:
    """:func:`log_mean_exp` over dim 0 of a stream of chunks ``[k_i, ...]``: keeps only the running
    ``logsumexp`` and the count, so evaluating K = 1000 importance weights in chunks holds one
    chunk in memory at a time. ``value()`` equals ``log_mean_exp(cat(chunks))`` exactly (up to
    rounding)."""

    def __init__(self) -> None:
        self.log_sum: Tensor | None = None
        self.count = 0

    def update(self, chunk: Tensor) -> None:
        part = torch.logsumexp(chunk, dim=0)
        self.log_sum = part if self.log_sum is None else torch.logaddexp(self.log_sum, part)
        self.count += chunk.shape[0]

    def value(self) -> Tensor:
        if self.log_sum is None:
            raise ValueError("RunningLogMeanExp.value: no chunk was added")
        return self.log_sum - math.log(self.count)


def log_bin_width(levels: int = 256) -> float:
    """``log(2 / (levels - 1))``, nats: the log-width of one bin of ``levels``-level data in [-1, 1].

    A smooth density p on [-1, 1] gives a bin the probability ``P(x) ~= p(x) 2 / (levels - 1)``, so
    ``-log2 P(x) ~= -log2 p(x) + log2((levels - 1) / 2)``: discrete bits/dim are the continuous
    bits/dim of the [-1, 1] data plus ``log2(127.5) = 6.994`` for 8 bits (dequantization's offset).
    """
    return math.log(2.0 / (levels - 1))


def dequantize(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Uniform dequantization of 8-bit images given in [-1, 1] (``k / 127.5 - 1``).

    Returns ``y = (k + u) / 128 - 1`` with ``u ~ U[0, 1)``: a continuous point in [-1, 1) whose
    density relates to the probability of pixel value k by the factor 128 per dimension (see
    :func:`bits_per_dim_discrete`). This is score_sde's convention, so numbers compare with papers.
    """
    k = torch.round((x + 1) * 127.5).clamp(0, 255)
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (k + u) / 128.0 - 1.0


def bits_per_dim_discrete(nll_dequantized_nats: Tensor, num_dims: int) -> Tensor:
    """Bits/dim of 8-bit data from the NLL of its dequantization ``y = (k + u)/128 - 1``.

    The density of ``u' = k + u`` in [0, 256) is the density of y divided by 128 per dimension, so
    ``-log2 p(u') = -log2 p(y) + D log2 128``: bits/dim = nll / (D ln 2) + 7. Averaged over u this
    upper-bounds the bits/dim of the discrete data (Theis et al. 2016; score_sde's ``offset = 7``).
    """
    return nats_to_bits_per_dim(nll_dequantized_nats, num_dims) + 7.0
