"""Discrete-time Gaussian diffusion (DDPM): noise schedules and the closed forms built on them.

Forward process (Ho et al. 2020, eq. 4): ``q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)``
with ``abar_t = prod_{s<=t} (1 - beta_s)``, for step indices ``t = 0 .. T-1`` (index 0 is the
paper's t = 1). All schedule arrays are float64; they are cast to the data's dtype only at the
moment they multiply data.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

BetaSchedule = Literal["linear", "cosine"]
Parameterization = Literal["eps", "x0", "v"]


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """Reshape a per-sample tensor [B] to [B, 1, ..., 1] with ``ndim`` dims, for any data shape."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def make_betas(name: BetaSchedule, timesteps: int) -> Tensor:
    """float64 betas of length ``timesteps``.

    - ``linear`` (Ho et al. 2020): evenly from 1e-4 to 0.02, scaled by 1000 / T so that other
      T keep the same total noise (as in improved-diffusion), clipped at 0.999 so that very short
      schedules (T < 50) stay valid.
    - ``cosine`` (Nichol & Dhariwal 2021, eq. 17): ``abar(t) = f(t)/f(0)``,
      ``f(t) = cos^2(((t/T + s)/(1 + s)) * pi/2)``, ``s = 0.008``, ``beta_t = 1 - abar_t/abar_{t-1}``
      clipped at 0.999.
    """
    if timesteps < 1:
        raise ValueError(f"timesteps must be >= 1, got {timesteps}")
    if name == "linear":
        scale = 1000.0 / timesteps
        return torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64).clamp(max=0.999)
    if name == "cosine":
        s = 0.008
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        abar = f / f[0]
        return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown beta_schedule {name!r}; choose 'linear' or 'cosine'")


class NoiseSchedule:
    """The DDPM forward process for a beta schedule, with the posterior ``q(x_{t-1} | x_t, x_0)``.

    Attributes (float64, length T): ``betas``, ``alphas_cumprod`` (abar_t),
    ``alphas_cumprod_prev`` (abar_{t-1}, 1 at t=0), ``posterior_variance`` (beta-tilde_t,
    Ho et al. eq. 7), ``posterior_mean_coef1``/``coef2`` (the weights of x_0 and x_t in the
    posterior mean).
    """

    def __init__(self, beta_schedule: BetaSchedule = "linear", timesteps: int = 1000):
        self.name, self.timesteps = beta_schedule, timesteps
        self.betas = make_betas(beta_schedule, timesteps)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.posterior_variance = self.betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)
        self.posterior_mean_coef1 = self.betas * self.alphas_cumprod_prev.sqrt() / (1 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1 - self.alphas_cumprod_prev) * (1 - self.betas).sqrt() / (1 - self.alphas_cumprod)
        self._cache: dict[tuple, Tensor] = {}

    def at(self, name: str, t: Tensor, like: Tensor) -> Tensor:
        """Schedule array ``name`` at integer steps ``t`` [B], shaped [B, 1, ...] in ``like``'s dtype/device."""
        key = (name, like.device)
        if key not in self._cache:  # one float64 copy per device
            self._cache[key] = getattr(self, name).to(like.device)
        values = self._cache[key][t.long()]
        return append_dims(values, like.ndim).to(like.dtype)

    # -- q(x_t | x_0) and the parameterizations ---------------------------------------------
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``."""
        abar = self.at("alphas_cumprod", t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def target(self, parameterization: Parameterization, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What a net in ``parameterization`` regresses: eps, x_0, or
        ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0`` (Salimans & Ho 2022)."""
        if parameterization == "eps":
            return noise
        if parameterization == "x0":
            return x0
        if parameterization == "v":
            abar = self.at("alphas_cumprod", t, x0)
            return abar.sqrt() * noise - (1 - abar).sqrt() * x0
        raise ValueError(f"unknown parameterization {parameterization!r}; choose 'eps', 'x0' or 'v'")

    def predict_x0(self, parameterization: Parameterization, output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """x_0 implied by the net's ``output`` at x_t:
        eps: ``(x_t - sqrt(1-abar) eps) / sqrt(abar)``; v: ``sqrt(abar) x_t - sqrt(1-abar) v``."""
        abar = self.at("alphas_cumprod", t, x_t)
        if parameterization == "eps":
            return (x_t - (1 - abar).sqrt() * output) / abar.sqrt()
        if parameterization == "x0":
            return output
        if parameterization == "v":
            return abar.sqrt() * x_t - (1 - abar).sqrt() * output
        raise ValueError(f"unknown parameterization {parameterization!r}; choose 'eps', 'x0' or 'v'")

    def q_posterior_mean(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Mean of ``q(x_{t-1} | x_t, x_0)`` (Ho et al. eq. 7)."""
        return self.at("posterior_mean_coef1", t, x_t) * x0 + self.at("posterior_mean_coef2", t, x_t) * x_t
