"""Gaussian diffusion processes in one form that every sampler and likelihood estimator uses.

Every process here has Gaussian marginals ``x_t = alpha(t) x_0 + sigma(t) eps`` and the forward
SDE with linear drift (Song et al. 2021, eq. 5)

    dx = f(t) x dt + g(t) dW,   f(t) = d log alpha / dt,   g(t)^2 = d sigma^2/dt - 2 f(t) sigma(t)^2.

Samplers need only alpha, sigma, f, g^2, the time range and the prior; the "VE-equivalent" noise
level ``sigma(t) / alpha(t)`` (EDM's sigma) and its inverse serve the Karras-grid samplers.

- :class:`VPSDE` (beta_min=0.1, beta_max=20), :class:`SubVPSDE`, :class:`VESDE`
  (sigma_min=0.01, sigma_max=50): Song et al. 2021, with continuous ``t`` in (0, 1], ``T = 1``.
- :class:`DiscreteVP`: a DDPM noise schedule as a process over the step index
  ``t`` in [0, T-1], ``log abar`` interpolated linearly between steps, so that continuous-time
  samplers work for DDPMs too (their nets take the step index as a float).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_diffusion.diffusion.schedules import NoiseSchedule, append_dims


class GaussianProcess:
    """Base class: alpha, sigma, f, g^2 as functions of t [B] (float64 inside, data dtype outside)."""

    t_min: float  # smallest time samplers integrate to (a ScoreSDE model keeps a copy with its t_eps)
    t_max: float  # time of the prior
    discrete: bool = False  # True where t is a DDPM step index: grids are then rounded to integers

    def alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def f(self, t: Tensor) -> Tensor:
        """Drift coefficient ``f(t) = d log alpha / dt``."""
        raise NotImplementedError

    def g2(self, t: Tensor) -> Tensor:
        """Squared diffusion ``g(t)^2``."""
        raise NotImplementedError

    def ratio(self, t: Tensor) -> Tensor:
        """EDM's noise level ``sigma(t) / alpha(t)`` (the std of ``x_t / alpha(t)`` around ``x_0``)."""
        return self.sigma(t) / self.alpha(t)

    def t_of_ratio(self, ratio: Tensor) -> Tensor:
        """Inverse of :meth:`ratio`."""
        raise NotImplementedError

    # -- score_sde's interface --------------------------------------------------------------
    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Forward SDE: (drift ``f(t) x`` [B, ...], diffusion ``g(t)`` [B])."""
        return append_dims(self.f(t), x.ndim).to(x.dtype) * x, self.g2(t).sqrt().to(x.dtype)

    def marginal_prob(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean ``alpha(t) x_0`` and std ``sigma(t)`` [B] of ``p_t(x_t | x_0)``."""
        return append_dims(self.alpha(t), x0.ndim).to(x0.dtype) * x0, self.sigma(t).to(x0.dtype)

    @property
    def prior_std(self) -> float:
        return float(self.sigma(torch.tensor([self.t_max], dtype=torch.float64))[0])

    def prior_sampling(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
                       device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
        """Draw x_T from the prior ``N(0, sigma(T)^2 I)``."""
        return self.prior_std * torch.randn(shape, generator=generator, device=device, dtype=dtype)

    def prior_logp(self, z: Tensor) -> Tensor:
        """Log-density of the prior ``N(0, sigma(T)^2 I)`` at z, summed over data dims: [B], in nats."""
        d = z[0].numel()
        s2 = self.prior_std**2
        return -0.5 * d * math.log(2 * math.pi * s2) - z.flatten(1).pow(2).sum(1) / (2 * s2)


def _t64(t: Tensor) -> Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


class VPSDE(GaussianProcess):
    """Variance-preserving SDE: ``dx = -beta(t)/2 x dt + sqrt(beta(t)) dW``,
    ``beta(t) = beta_min + t (beta_max - beta_min)``; the continuous limit of DDPM's linear schedule."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-5):
        self.beta_min, self.beta_max, self.t_min, self.t_max = beta_min, beta_max, t_min, 1.0
        self.T = 1.0

    def beta(self, t: Tensor) -> Tensor:
        return self.beta_min + _t64(t) * (self.beta_max - self.beta_min)

    def log_alpha(self, t: Tensor) -> Tensor:
        """``log alpha(t) = -t^2 (beta_max - beta_min)/4 - t beta_min / 2``."""
        t = _t64(t)
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def alpha(self, t: Tensor) -> Tensor:
        return self.log_alpha(t).exp()

    def sigma(self, t: Tensor) -> Tensor:
        return (-torch.expm1(2 * self.log_alpha(t))).sqrt()

    def f(self, t: Tensor) -> Tensor:
        return -0.5 * self.beta(t)

    def g2(self, t: Tensor) -> Tensor:
        return self.beta(t)

    def _t_of_log_alpha(self, log_alpha: Tensor) -> Tensor:
        # solve (b1 - b0)/4 t^2 + b0/2 t + log_alpha = 0 for t >= 0
        a, b = 0.25 * (self.beta_max - self.beta_min), 0.5 * self.beta_min
        if a == 0:
            return -log_alpha / b
        return (-b + (b * b - 4 * a * log_alpha).sqrt()) / (2 * a)

    def t_of_ratio(self, ratio: Tensor) -> Tensor:
        # sigma/alpha = sqrt(alpha^-2 - 1)  =>  log alpha = -log(1 + ratio^2) / 2
        return self._t_of_log_alpha(-0.5 * torch.log1p(_t64(ratio) ** 2))


class SubVPSDE(VPSDE):
    """sub-VP SDE: VP's drift with ``g(t)^2 = beta(t) (1 - exp(-2 int_0^t beta))``; its marginal std
    ``1 - alpha(t)^2`` is below VP's everywhere (Song et al. 2021, eq. 11)."""

    def sigma(self, t: Tensor) -> Tensor:
        return -torch.expm1(2 * self.log_alpha(t))

    def g2(self, t: Tensor) -> Tensor:
        return self.beta(t) * -torch.expm1(4 * self.log_alpha(t))

    def t_of_ratio(self, ratio: Tensor) -> Tensor:
        # ratio = (1 - alpha^2) / alpha  =>  alpha = (sqrt(ratio^2 + 4) - ratio) / 2
        r = _t64(ratio)
        return self._t_of_log_alpha(torch.log(((r * r + 4).sqrt() - r) / 2))


class VESDE(GaussianProcess):
    """Variance-exploding SDE: ``sigma(t) = sigma_min (sigma_max / sigma_min)^t``, no drift,
    ``g(t)^2 = d sigma^2 / dt``; the prior is ``N(0, sigma_max^2 I)``."""

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, t_min: float = 1e-5):
        self.sigma_min, self.sigma_max, self.t_min, self.t_max = sigma_min, sigma_max, t_min, 1.0
        self.T = 1.0
        self._log_ratio = math.log(sigma_max / sigma_min)

    def alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(_t64(t))

    def sigma(self, t: Tensor) -> Tensor:
        return self.sigma_min * torch.exp(_t64(t) * self._log_ratio)

    def f(self, t: Tensor) -> Tensor:
        return torch.zeros_like(_t64(t))

    def g2(self, t: Tensor) -> Tensor:
        return 2 * self._log_ratio * self.sigma(t) ** 2

    def t_of_ratio(self, ratio: Tensor) -> Tensor:
        return torch.log(_t64(ratio) / self.sigma_min) / self._log_ratio


class DiscreteVP(GaussianProcess):
    """A DDPM schedule as a process over the step index ``t`` in [0, T-1].

    ``alpha(t)^2 = abar(t)`` with ``log abar`` linear between integer steps, so f and g^2 are
    piecewise constant: ``f = (log abar_{i+1} - log abar_i) / 2`` on [i, i+1] (about -beta/2) and
    ``g^2 = -d abar/dt - 2 f (1 - abar) = -2 f`` (variance preserving).
    """

    discrete = True

    def __init__(self, schedule: NoiseSchedule):
        self.schedule = schedule
        self.log_abar = torch.log(schedule.alphas_cumprod)
        self.t_min, self.t_max = 0.0, float(schedule.timesteps - 1)
        self.T = self.t_max

    def _interp(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = _t64(t).clamp(0, self.t_max)
        i = t.floor().long().clamp(max=len(self.log_abar) - 2) if len(self.log_abar) > 1 else t.long()
        log_abar = self.log_abar.to(t.device)
        if len(log_abar) == 1:
            return log_abar[i], torch.zeros_like(t)
        slope = log_abar[i + 1] - log_abar[i]
        return log_abar[i] + (t - i) * slope, slope

    def alpha(self, t: Tensor) -> Tensor:
        return (0.5 * self._interp(t)[0]).exp()

    def sigma(self, t: Tensor) -> Tensor:
        return (-torch.expm1(self._interp(t)[0])).sqrt()

    def f(self, t: Tensor) -> Tensor:
        return 0.5 * self._interp(t)[1]

    def g2(self, t: Tensor) -> Tensor:
        return -self._interp(t)[1]

    def t_of_ratio(self, ratio: Tensor) -> Tensor:
        # log abar = -log(1 + ratio^2), decreasing in t: invert the piecewise-linear interpolation
        target = -torch.log1p(_t64(ratio) ** 2)
        log_abar = self.log_abar.to(target.device)
        descending = -log_abar  # increasing
        i = torch.searchsorted(descending, -target).clamp(1, len(log_abar) - 1) - 1
        lo, hi = log_abar[i], log_abar[i + 1]
        return (i + (target - lo) / (hi - lo)).clamp(0, self.t_max)
