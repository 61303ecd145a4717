"""Exact ground truth: an isotropic Gaussian mixture and its noised marginals at every t.

If ``x_0 ~ sum_k w_k N(mu_k, s_k^2 I)`` and ``x_t = alpha x_0 + sigma eps``, then
``x_t ~ sum_k w_k N(alpha mu_k, (alpha^2 s_k^2 + sigma^2) I)``: density, score and the optimal
denoiser ``E[x_0 | x_t] = (x_t + sigma^2 score) / alpha`` (Tweedie) are analytic. An oracle
network built from them is the exact minimiser of every denoising loss, so samplers and
likelihood estimators can be checked against the mixture itself.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

import lightning_diffusion.diffusion.parameterization as param


class GaussianMixture:
    """``sum_k weights_k N(means_k, stds_k^2 I)`` in D dimensions, computed in float64.

    Args:
        means: component means [K, D].
        stds: component standard deviations [K] (isotropic).
        weights: mixture weights [K], normalised here.
    """

    def __init__(self, means: Tensor, stds: Tensor, weights: Tensor | None = None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.stds = torch.as_tensor(stds, dtype=torch.float64).expand(self.means.shape[0]).clone()
        w = torch.ones(self.means.shape[0], dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.weights = w / w.sum()
        self.dim = self.means.shape[1]

    @classmethod
    def circle(cls, num_modes: int = 8, radius: float = 2.0, std: float = 0.1) -> "GaussianMixture":
        """The 2-D toy set ``gaussians8``: equal modes on a circle."""
        angle = 2 * math.pi * torch.arange(num_modes, dtype=torch.float64) / num_modes
        return cls(radius * torch.stack([angle.cos(), angle.sin()], 1), torch.full((num_modes,), std))

    @classmethod
    def random(cls, num_modes: int, dim: int, seed: int = 0, spread: float = 1.5, std: float = 0.3) -> "GaussianMixture":
        """A mixture of ``num_modes`` modes in ``dim`` dimensions, means ~ N(0, spread^2 I), unequal weights."""
        g = torch.Generator().manual_seed(seed)
        means = spread * torch.randn(num_modes, dim, generator=g, dtype=torch.float64)
        weights = 0.5 + torch.rand(num_modes, generator=g, dtype=torch.float64)
        return cls(means, torch.full((num_modes,), std), weights)

    def product(self, other: "GaussianMixture") -> "GaussianMixture":
        """The normalised product ``p(x) q(x) / Z``, itself an isotropic mixture: each pair of
        components ``N(m_a, s_a^2 I) N(m_b, s_b^2 I) = N(m_a; m_b, (s_a^2 + s_b^2) I) N(m, s^2 I)``
        with ``1 / s^2 = 1 / s_a^2 + 1 / s_b^2`` and ``m = s^2 (m_a / s_a^2 + m_b / s_b^2)``, of weight
        ``w_a w_b N(m_a; m_b, (s_a^2 + s_b^2) I)`` (normalised here; their sum is Z)."""
        var_a, var_b = self.stds[:, None] ** 2, other.stds[None, :] ** 2  # [Ka, 1], [1, Kb]
        var = 1 / (1 / var_a + 1 / var_b)  # [Ka, Kb]
        means = var[..., None] * (self.means[:, None, :] / var_a[..., None] + other.means[None, :, :] / var_b[..., None])
        overlap = self._pair_log_overlap(other)
        log_w = self.weights.log()[:, None] + other.weights.log()[None, :] + overlap
        return GaussianMixture(means.reshape(-1, self.dim), var.sqrt().reshape(-1), (log_w - log_w.max()).exp().reshape(-1))

    def log_normaliser_of_product(self, other: "GaussianMixture") -> Tensor:
        """``log Z = log integral p(x) q(x) dx`` (a float64 scalar) of :meth:`product`."""
        return torch.logsumexp((self.weights.log()[:, None] + other.weights.log()[None, :]
                                + self._pair_log_overlap(other)).flatten(), 0)

    def _pair_log_overlap(self, other: "GaussianMixture") -> Tensor:
        """``log N(m_a; m_b, (s_a^2 + s_b^2) I)`` [Ka, Kb]: the integral of the product of two components."""
        var = self.stds[:, None] ** 2 + other.stds[None, :] ** 2
        diff2 = (self.means[:, None, :] - other.means[None, :, :]).pow(2).sum(-1)
        return -0.5 * self.dim * torch.log(2 * math.pi * var) - diff2 / (2 * var)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """n points [n, D] (float64) and their components [n]."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k, None] * noise, k

    def _noised(self, x: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
        """Per-sample, per-component (log w_k N(x; alpha mu_k, var_k I), var_k, alpha) with shapes [B, K]."""
        x = x.to(torch.float64)
        alpha = torch.as_tensor(alpha, dtype=torch.float64, device=x.device).reshape(-1, 1).expand(x.shape[0], 1)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, 1).expand(x.shape[0], 1)
        var = alpha**2 * self.stds.to(x.device) ** 2 + sigma**2  # [B, K]
        diff2 = (x[:, None, :] - alpha[:, :, None] * self.means.to(x.device)).pow(2).sum(-1)  # [B, K]
        log_comp = self.weights.to(x.device).log() - 0.5 * self.dim * torch.log(2 * math.pi * var) - diff2 / (2 * var)
        return log_comp, var, alpha

    def log_prob(self, x: Tensor, alpha: Tensor | float = 1.0, sigma: Tensor | float = 0.0) -> Tensor:
        """Log-density [B] (nats) of ``x`` [B, D] under the marginal of ``alpha x_0 + sigma eps``."""
        return torch.logsumexp(self._noised(x, alpha, sigma)[0], dim=1)

    def energy(self, x: Tensor, alpha: Tensor | float = 1.0, sigma: Tensor | float = 0.0) -> Tensor:
        """The exact energy ``-log p_t(x)`` [B] (nats, normalised: no constant) of the noised marginal;
        differentiable in ``x`` (``-grad_x`` of it is :meth:`score`)."""
        return -self.log_prob(x, alpha, sigma)

    def score(self, x: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
        """``grad_x log p(x)`` [B, D] of the noised marginal."""
        log_comp, var, alpha = self._noised(x, alpha, sigma)
        resp = torch.softmax(log_comp, dim=1)  # posterior over components
        x64 = x.to(torch.float64)
        per_comp = -(x64[:, None, :] - alpha[:, :, None] * self.means.to(x.device)) / var[:, :, None]
        return (resp[:, :, None] * per_comp).sum(1)

    def denoise(self, x: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
        """``E[x_0 | x_t = x]`` [B, D] by Tweedie's formula."""
        alpha_b = torch.as_tensor(alpha, dtype=torch.float64, device=x.device).reshape(-1, 1)
        sigma_b = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, 1)
        return (x.to(torch.float64) + sigma_b**2 * self.score(x, alpha, sigma)) / alpha_b


class MixtureOracle(nn.Module):
    """The exact denoising network for a :class:`GaussianMixture` under a process, in any parameterization.

    ``forward(x, t, y=None)`` returns what a trained net in ``parameterization`` would output at
    the optimum, the target of its row of :mod:`~lightning_diffusion.diffusion.parameterization` at
    ``x0 = E[x_0 | x_t]``, ``eps = E[eps | x_t]`` (``eps`` = E[eps | x_t], ``x0`` = E[x_0 | x_t], ``v`` =
    alpha eps - sigma x0, ``score`` = grad log p_t); the net's input is x_t itself (c_in = 1, so not
    ``edm``). A row whose net outputs an energy (``energy``) gets the exact energy
    ``-log p_t(x_t) / energy_scale`` [B] (for ``energy``: sigma-nats), whose gradient is then taken
    by the row like a trained net's. ``process`` is any object with ``alpha(t)`` and ``sigma(t)``.
    """

    def __init__(self, mixture: GaussianMixture, process, parameterization: str = "eps"):
        super().__init__()
        self.mixture, self.process, self.parameterization = mixture, process, parameterization
        self.register_buffer("_anchor", torch.zeros(()))  # gives the module a device/dtype

    def energy(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """The exact energy ``E(x_t, t) = -log p_t(x_t)`` [B] in x's dtype (the ``energy`` a model of
        parameterization ``energy`` learns), for data [B, D] or any shape of D values per sample."""
        alpha, sigma = self.process.alpha(t).to(x.device), self.process.sigma(t).to(x.device)
        return self.mixture.energy(x.flatten(1), alpha, sigma).to(x.dtype)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        alpha, sigma = self.process.alpha(t).to(x.device), self.process.sigma(t).to(x.device)
        energy_scale = param.row(self.parameterization).energy_scale
        if energy_scale is not None:
            return (self.mixture.energy(x, alpha, sigma) / energy_scale(alpha, sigma, 0.5)).to(x.dtype)
        score = self.mixture.score(x, alpha, sigma)
        a, s = alpha[:, None], sigma[:, None]
        x0 = (x.to(torch.float64) + s**2 * score) / a
        return param.target(self.parameterization, x0, -s * score, a, s).to(x.dtype)
