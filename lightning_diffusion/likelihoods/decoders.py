"""Decoder likelihoods ``p(x | z)`` of the latent-variable families: pure math, no Lightning.

Data live in [-1, 1]. 8-bit images hold ``x = k / 127.5 - 1`` for ``k`` in 0..255: the bin of ``x``
is ``[x - delta, x + delta]`` with ``delta = 1 / (levels - 1)`` (half the bin width 2/255) and the
outermost bins reach to -inf and +inf, so the probabilities of the 256 bins sum to 1 and a
negative log-probability is a code length of the discrete data (what papers report in bits/dim).
Continuous data (2-D points) get a density instead.

Every ``*_log_prob`` here is elementwise, in nats, unless its name says otherwise; the Gaussian
density is in :mod:`.gaussian` and reused here, not repeated. :class:`DecoderLikelihood` bundles
one decoder distribution: how many output channels its parameters take, the log-probability of a
sample in nats, a sample and a mean.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor
from torch.nn import functional as F

from lightning_diffusion.likelihoods.bits import sum_over_dims
from lightning_diffusion.likelihoods.gaussian import (diagonal_gaussian_sample, discretized_gaussian_log_likelihood,
                                                      gaussian_log_likelihood)

LikelihoodName = Literal["bernoulli", "gaussian", "discretized_logistic", "dmol"]
LIKELIHOODS: tuple[str, ...] = ("bernoulli", "gaussian", "discretized_logistic", "dmol")

MIN_LOG_SCALE = -7.0  # PixelCNN++: log-scales of the logistics are clamped from below at -7


# -- the decoder log-likelihoods ---------------------------------------------------------------
def bernoulli_log_prob(x: Tensor, logits: Tensor) -> Tensor:
    """``log Bernoulli(b; sigmoid(logits))`` of the binarized data ``b = [x > 0]``, elementwise, in nats:
    ``b log sigmoid(l) + (1 - b) log sigmoid(-l) = -softplus(-l) if b else -softplus(l)``.

    It is the likelihood of the *binarized* data (binarized MNIST); its bits/dim do not compare
    with 8-bit ones."""
    target = (x > 0).to(logits.dtype)
    return -F.binary_cross_entropy_with_logits(logits, target, reduction="none")


def _log_sigmoid_interval(lower: Tensor, upper: Tensor) -> Tensor:
    """``log(sigmoid(upper) - sigmoid(lower))`` for ``lower < upper``, exact and stable in both tails:
    ``sigmoid(b) - sigmoid(a) = sigmoid(b) sigmoid(-a) (1 - exp(a - b))``."""
    return F.logsigmoid(upper) + F.logsigmoid(-lower) + torch.log(-torch.expm1(lower - upper))


def discretized_logistic_log_prob(x: Tensor, mean: Tensor, log_scale: Tensor, levels: int = 256) -> Tensor:
    """Log-probability of the bin of ``x`` under the logistic ``L(mean, s)``, ``s = exp(log_scale)``,
    elementwise, in nats (PixelCNN++, Salimans et al. 2017, eq. 2; IAF-VAE, Kingma et al. 2016):

    ``log P(x) = log(sigmoid((x + delta - mean) / s) - sigmoid((x - delta - mean) / s))``, with
    ``delta = 1 / (levels - 1)`` and the edge bins open: ``x = -1`` gets ``log sigmoid((-1 + delta -
    mean) / s)``, ``x = 1`` gets ``log(1 - sigmoid((1 - delta - mean) / s))``. The ``levels``
    probabilities sum to 1. ``log_scale`` is clamped from below at -7 (PixelCNN++).
    """
    delta = 1.0 / (levels - 1)
    log_scale = log_scale.clamp(min=MIN_LOG_SCALE)
    inv_scale = torch.exp(-log_scale)
    upper = (x - mean + delta) * inv_scale
    lower = (x - mean - delta) * inv_scale
    edge = 1.0 - 0.5 * delta
    return torch.where(x < -edge, F.logsigmoid(upper),
                       torch.where(x > edge, F.logsigmoid(-lower), _log_sigmoid_interval(lower, upper)))


def dmol_param_channels(channels: int, num_mixtures: int) -> int:
    """Parameters per pixel of a discretized mixture of logistics over ``channels`` coupled channels:
    ``M`` mixture logits, ``C M`` means, ``C M`` log-scales and ``M C (C - 1) / 2`` coupling
    coefficients (RGB: ``10 M``, PixelCNN++'s 100 for M = 10; grey: ``3 M``)."""
    return num_mixtures * (1 + 2 * channels + channels * (channels - 1) // 2)


def _split_dmol(params: Tensor, channels: int, num_mixtures: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``params`` [B, P, *S] -> logits [B, M, *S], means and log-scales [B, C, M, *S], coefficients
    [B, C(C-1)/2, M, *S] (tanh-squashed to (-1, 1) as in PixelCNN++)."""
    expected = dmol_param_channels(channels, num_mixtures)
    if params.shape[1] != expected:
        raise ValueError(f"dmol with {channels} channels and num_mixtures={num_mixtures} takes {expected} parameter "
                         f"channels, got {params.shape[1]}")
    m, c, spatial = num_mixtures, channels, params.shape[2:]
    logits, means, log_scales, coeffs = params.split([m, c * m, c * m, m * c * (c - 1) // 2], dim=1)
    shape = (params.shape[0], -1, m, *spatial)
    return logits, means.reshape(shape), log_scales.reshape(shape), torch.tanh(coeffs.reshape(shape))


def _coupled_means(means: Tensor, coeffs: Tensor, x: Tensor) -> Tensor:
    """Channel ``c``'s mean ``mu_c + sum_{j < c} a_{c j} x_j`` (PixelCNN++'s RGB coupling:
    ``g += a_0 r``, ``b += a_1 r + a_2 g``); ``x`` [B, C, *S] broadcasts over the mixtures."""
    out, k = [means[:, 0]], 0
    for c in range(1, means.shape[1]):
        mean = means[:, c]
        for j in range(c):
            mean = mean + coeffs[:, k] * x[:, j].unsqueeze(1)
            k += 1
        out.append(mean)
    return torch.stack(out, dim=1)


def dmol_log_prob(x: Tensor, params: Tensor, num_mixtures: int, levels: int = 256) -> Tensor:
    """Log-probability of the ``levels``-level pixels ``x`` [B, C, *S] under a discretized mixture of
    logistics with channel coupling, per pixel [B, *S], in nats (PixelCNN++ eq. 3; NVAE, VDVAE):

    ``P(x) = sum_m pi_m prod_c P_logistic(x_c | mu_{m c} + sum_{j < c} a_{m c j} x_j, s_{m c})``,

    each factor the discretized logistic of :func:`discretized_logistic_log_prob`; so the
    probabilities over all ``levels^C`` colours sum to 1. With C = 1 there is no coupling.
    """
    channels = x.shape[1]
    logits, means, log_scales, coeffs = _split_dmol(params, channels, num_mixtures)
    means = _coupled_means(means, coeffs, x)
    per_channel = discretized_logistic_log_prob(x.unsqueeze(2), means, log_scales, levels)  # [B, C, M, *S]
    return torch.logsumexp(per_channel.sum(1) + torch.log_softmax(logits, dim=1), dim=1)


def _quantize(x: Tensor, levels: int) -> Tensor:
    """Round values in [-1, 1] to the nearest of the ``levels`` grid points ``k / ((levels-1)/2) - 1``."""
    half = (levels - 1) / 2
    return torch.round((x.clamp(-1, 1) + 1) * half) / half - 1


def _logistic_noise(shape, like: Tensor, generator: torch.Generator | None) -> Tensor:
    u = torch.rand(shape, generator=generator, device=like.device, dtype=like.dtype).clamp(1e-5, 1 - 1e-5)
    return torch.log(u) - torch.log1p(-u)


def dmol_sample(params: Tensor, channels: int, num_mixtures: int, levels: int = 256,
                generator: torch.Generator | None = None) -> Tensor:
    """Draw pixels [B, C, *S] on the ``levels`` grid from the mixture of :func:`dmol_log_prob`: a
    component per pixel, then the channels in order, each from its logistic with the coupled mean."""
    logits, means, log_scales, coeffs = _split_dmol(params, channels, num_mixtures)
    gumbel = -torch.log(-torch.log(torch.rand(logits.shape, generator=generator, device=logits.device,
                                               dtype=logits.dtype).clamp(1e-12, 1 - 1e-7)))
    pick = F.one_hot((logits + gumbel).argmax(1), num_mixtures).movedim(-1, 1).to(means.dtype)  # [B, M, *S]
    means, scales = (means * pick.unsqueeze(1)).sum(2), (log_scales.clamp(min=MIN_LOG_SCALE).exp() * pick.unsqueeze(1)).sum(2)
    coeffs = (coeffs * pick.unsqueeze(1)).sum(2)
    noise = _logistic_noise(means.shape, means, generator)
    x, k = [], 0
    for c in range(channels):
        mean = means[:, c]
        for j in range(c):
            mean = mean + coeffs[:, k] * x[j]
            k += 1
        x.append(_quantize(mean + scales[:, c] * noise[:, c], levels))
    return torch.stack(x, dim=1)


def dmol_mean(params: Tensor, channels: int, num_mixtures: int) -> Tensor:
    """A point summary of the mixture (for reconstructions): ``sum_m pi_m mu_m`` per channel, with the
    coupling applied to the summaries of the earlier channels; clamped to [-1, 1]."""
    logits, means, _, coeffs = _split_dmol(params, channels, num_mixtures)
    weights = torch.softmax(logits, dim=1)
    x: list[Tensor] = []
    k = 0
    for c in range(channels):
        mean = means[:, c]
        for j in range(c):
            mean = mean + coeffs[:, k] * x[j].unsqueeze(1)
            k += 1
        x.append((weights * mean).sum(1).clamp(-1, 1))
    return torch.stack(x, dim=1)


# -- one decoder distribution ------------------------------------------------------------------
class DecoderLikelihood:
    """``p(x | z)`` given the decoder's parameter tensor ``params`` [B, param_channels, *S].

    - ``bernoulli``: ``C`` logits of the binarized data ``[x > 0]`` (images only).
    - ``gaussian``: ``C`` means, plus ``C`` log-scales unless ``fixed_std`` is given. 8-bit images
      get the probability of their bin (:func:`~lightning_diffusion.likelihoods.gaussian.discretized_gaussian_log_likelihood`),
      points the density.
    - ``discretized_logistic``: ``C`` means and ``C`` log-scales, independent per channel (8-bit only).
    - ``dmol``: ``num_mixtures`` logistics with channel coupling, :func:`dmol_param_channels` (8-bit only).

    Args:
        name: one of ``bernoulli``, ``gaussian``, ``discretized_logistic``, ``dmol``.
        channels: channels ``C`` of an image, or the dimension ``D`` of a point.
        discrete: True for 8-bit images (scored as discrete data), False for continuous points.
        num_mixtures: mixture components of ``dmol`` (PixelCNN++/VDVAE: 10).
        fixed_std: ``gaussian`` only: a fixed standard deviation (in data units); None learns it.
        levels: number of discrete values of the data (256 for 8 bits).
    """

    def __init__(self, name: str, channels: int, *, discrete: bool, num_mixtures: int = 10,
                 fixed_std: float | None = None, levels: int = 256):
        if name not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {name!r}; choose one of {', '.join(map(repr, LIKELIHOODS))}")
        if name in ("discretized_logistic", "dmol", "bernoulli") and not discrete:
            raise ValueError(f"likelihood {name!r} scores 8-bit images; the data here are continuous points: "
                             "use likelihood='gaussian'")
        if name == "dmol" and num_mixtures < 1:
            raise ValueError(f"likelihood 'dmol' needs num_mixtures >= 1, got {num_mixtures}")
        if fixed_std is not None and fixed_std <= 0:
            raise ValueError(f"gaussian fixed_std must be > 0 (or None to learn it), got {fixed_std}")
        self.name, self.channels, self.discrete = name, channels, discrete
        self.num_mixtures, self.fixed_std, self.levels = num_mixtures, fixed_std, levels

    @property
    def param_channels(self) -> int:
        """Channels of ``params`` the decoder must output."""
        c = self.channels
        if self.name == "dmol":
            return dmol_param_channels(c, self.num_mixtures)
        if self.name == "bernoulli" or (self.name == "gaussian" and self.fixed_std is not None):
            return c
        return 2 * c

    def _mean_log_scale(self, params: Tensor) -> tuple[Tensor, Tensor]:
        if self.name == "gaussian" and self.fixed_std is not None:
            return params, torch.full_like(params, math.log(self.fixed_std))
        mean, log_scale = params.chunk(2, dim=1)
        return mean, log_scale.clamp(min=MIN_LOG_SCALE)

    def _check(self, x: Tensor, params: Tensor) -> None:
        if params.shape[0] != x.shape[0] or params.shape[1] != self.param_channels or params.shape[2:] != x.shape[2:]:
            raise ValueError(f"likelihood {self.name!r}: params of shape {tuple(params.shape)} do not fit data of shape "
                             f"{tuple(x.shape)}; expected [B, {self.param_channels}, *spatial]")

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        """``log p(x | z)`` per sample [B], in nats (summed over all dimensions)."""
        self._check(x, params)
        if self.name == "bernoulli":
            return sum_over_dims(bernoulli_log_prob(x, params))
        if self.name == "dmol":
            return sum_over_dims(dmol_log_prob(x, params, self.num_mixtures, self.levels))
        mean, log_scale = self._mean_log_scale(params)
        if self.name == "discretized_logistic":
            return sum_over_dims(discretized_logistic_log_prob(x, mean, log_scale, self.levels))
        if self.discrete:
            return sum_over_dims(discretized_gaussian_log_likelihood(x, mean, log_scale, self.levels))
        return sum_over_dims(gaussian_log_likelihood(x, mean, log_scale))

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``x ~ p(x | z)`` in data space: on the 8-bit grid for images (bernoulli: -1 or 1)."""
        if self.name == "bernoulli":
            u = torch.rand(params.shape, generator=generator, device=params.device, dtype=params.dtype)
            return torch.where(u < torch.sigmoid(params), 1.0, -1.0).to(params.dtype)
        if self.name == "dmol":
            return dmol_sample(params, self.channels, self.num_mixtures, self.levels, generator)
        mean, log_scale = self._mean_log_scale(params)
        if self.name == "discretized_logistic":
            x = mean + log_scale.exp() * _logistic_noise(mean.shape, mean, generator)
        else:
            x = diagonal_gaussian_sample(mean, 2 * log_scale, generator)
        return _quantize(x, self.levels) if self.discrete else x

    def mean(self, params: Tensor) -> Tensor:
        """A point summary in data space (reconstructions): the mean (bernoulli: ``2 p - 1``; dmol:
        :func:`dmol_mean`), clamped to [-1, 1] for images."""
        if self.name == "bernoulli":
            return 2 * torch.sigmoid(params) - 1
        if self.name == "dmol":
            return dmol_mean(params, self.channels, self.num_mixtures)
        mean, _ = self._mean_log_scale(params)
        return mean.clamp(-1, 1) if self.discrete else mean
