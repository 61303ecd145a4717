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

import lightning_diffusion.diffusion.parameterization as param

BetaSchedule = Literal["linear", "cosine"]
Variance = Literal["fixedlarge", "fixedsmall"]


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
    posterior mean), ``snr`` (``abar_t / (1 - abar_t)``), and the log-variances of the reverse
    process :meth:`model_log_variance` chooses from. ``original_steps`` (int64, length T) maps each
    step to the step of the schedule it was respaced from (:meth:`respaced`; ``arange(T)`` here):
    the net is always called with the original step.
    """

    def __init__(self, beta_schedule: BetaSchedule = "linear", timesteps: int = 1000):
        self.name = beta_schedule
        self._build(make_betas(beta_schedule, timesteps), torch.arange(timesteps))

    @classmethod
    def from_betas(cls, betas: Tensor, name: str = "custom", original_steps: Tensor | None = None) -> "NoiseSchedule":
        """A schedule from explicit betas (float64, each in (0, 1])."""
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) < 1 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("NoiseSchedule.from_betas: betas must be a non-empty 1-D tensor with values in (0, 1]")
        schedule = cls.__new__(cls)
        schedule.name = name
        schedule._build(betas, torch.arange(len(betas)) if original_steps is None else original_steps.long())
        return schedule

    def _build(self, betas: Tensor, original_steps: Tensor) -> None:
        self.timesteps, self.betas, self.original_steps = len(betas), betas, original_steps
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.posterior_variance = self.betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)
        self.posterior_mean_coef1 = self.betas * self.alphas_cumprod_prev.sqrt() / (1 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1 - self.alphas_cumprod_prev) * (1 - self.betas).sqrt() / (1 - self.alphas_cumprod)
        self.snr = self.alphas_cumprod / (1 - self.alphas_cumprod)
        # beta-tilde_0 = 0: like Ho et al. and improved-diffusion, step 0 uses beta-tilde_1 instead
        first = self.posterior_variance[1:2] if self.timesteps > 1 else self.betas[:1]
        self.posterior_log_variance_clipped = torch.log(torch.cat([first, self.posterior_variance[1:]]))
        self.log_betas = torch.log(self.betas)
        self.fixedlarge_log_variance = torch.log(torch.cat([first, self.betas[1:]]))
        self._cache: dict[tuple, Tensor] = {}

    def respaced(self, steps: int) -> "NoiseSchedule":
        """The schedule restricted to ``steps`` evenly spaced steps ``t_0 = 0 < ... < t_{S-1} = T-1``
        (``t_i = round(i (T-1) / (S-1))``), with the betas recomputed so that the marginals are kept:
        ``beta'_i = 1 - abar_{t_i} / abar_{t_{i-1}}`` (Nichol & Dhariwal 2021, sec. 4).
        ``original_steps`` holds the ``t_i``."""
        if not 1 <= steps <= self.timesteps:
            raise ValueError(f"steps must be in [1, timesteps={self.timesteps}], got {steps}")
        index = torch.round(torch.linspace(0, self.timesteps - 1, steps, dtype=torch.float64)).long()
        abar = self.alphas_cumprod[index]
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        return NoiseSchedule.from_betas(1 - abar / abar_prev, f"{self.name}/respaced{steps}", self.original_steps[index])

    def at(self, name: str, t: Tensor, like: Tensor) -> Tensor:
        """Schedule array ``name`` at integer steps ``t`` [B], shaped [B, 1, ...] in ``like``'s dtype/device."""
        key = (name, like.device)
        if key not in self._cache:  # one float64 copy per device
            self._cache[key] = getattr(self, name).to(like.device)
        values = self._cache[key][t.long()]
        return append_dims(values, like.ndim).to(like.dtype)

    # -- q(x_t | x_0) and the parameterizations ---------------------------------------------
    def alpha_sigma(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """``(sqrt(abar_t), sqrt(1 - abar_t))`` at integer steps ``t`` [B], float64, shaped [B, 1, ...]
        like ``like``, on its device."""
        abar = append_dims(self.alphas_cumprod.to(like.device)[t.long()], like.ndim)
        return abar.sqrt(), (1 - abar).sqrt()

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``."""
        abar = self.at("alphas_cumprod", t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def target(self, parameterization: str, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What a net in ``parameterization`` regresses at integer step ``t``
        (:func:`~lightning_diffusion.diffusion.parameterization.target`)."""
        return param.target(parameterization, x0, noise, *self.alpha_sigma(t, x0))

    def predict_x0(self, parameterization: str, output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """x_0 implied by the net's ``output`` at x_t and integer step ``t``
        (:func:`~lightning_diffusion.diffusion.parameterization.x0_from_output`)."""
        return param.x0_from_output(parameterization, output, x_t, *self.alpha_sigma(t, x_t)).to(x_t.dtype)

    def q_posterior_mean(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Mean of ``q(x_{t-1} | x_t, x_0)`` (Ho et al. eq. 7)."""
        return self.at("posterior_mean_coef1", t, x_t) * x0 + self.at("posterior_mean_coef2", t, x_t) * x_t

    def model_log_variance(self, variance: Variance, t: Tensor, like: Tensor, v: Tensor | None = None) -> Tensor:
        """log Sigma_theta(x_t, t) of the reverse process ``p(x_{t-1} | x_t)``.

        With ``v`` (a learned variance, improved DDPM eq. 15): ``frac = (v + 1) / 2`` and
        ``log Sigma = frac log beta_t + (1 - frac) log beta-tilde_t``, elementwise, ``v`` in [-1, 1].
        Otherwise fixed: ``fixedsmall`` = log beta-tilde_t, ``fixedlarge`` = log beta_t (both with
        beta-tilde_1 at t = 0, as improved-diffusion). Shape [B, 1, ...] (fixed) or v's shape.
        """
        if v is not None:
            frac = (v + 1) / 2
            return frac * self.at("log_betas", t, like) + (1 - frac) * self.at("posterior_log_variance_clipped", t, like)
        if variance == "fixedsmall":
            return self.at("posterior_log_variance_clipped", t, like)
        if variance == "fixedlarge":
            return self.at("fixedlarge_log_variance", t, like)
        raise ValueError(f"unknown variance {variance!r}; choose 'fixedlarge' or 'fixedsmall'")
