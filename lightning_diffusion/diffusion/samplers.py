"""Samplers by name. A sampler is a function of (denoiser or score function, schedule or SDE, options).

``denoise_fn(x_t, t) -> x0_hat`` is the model's estimate of the clean data at integer step
``t`` [B] (float); the samplers know nothing about networks or parameterizations.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor

from lightning_diffusion.diffusion.schedules import NoiseSchedule

Denoiser = Callable[[Tensor, Tensor], Tensor]
AncestralVariance = Literal["fixedlarge", "fixedsmall"]


@torch.no_grad()
def ancestral(
    denoise_fn: Denoiser,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    variance: AncestralVariance = "fixedlarge",
    clip: tuple[float, float] | None = (-1.0, 1.0),
) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2), written through x0_hat.

    ``x_T ~ N(0, I)``; for t = T-1 .. 0: ``x_{t-1} = mu~_t(x0_hat, x_t) + sigma_t z`` with
    ``mu~`` the posterior mean and ``sigma_t^2 = beta_t`` (``fixedlarge``; beta-tilde_1 at the
    last step, as in Ho et al.'s code) or beta-tilde_t (``fixedsmall``); no noise at t = 0.
    ``clip`` clamps x0_hat to the data range (images), None for unbounded data.
    """
    x = torch.randn(shape, generator=generator, device=device)
    var_name = "posterior_variance" if variance == "fixedsmall" else "betas"
    for step in reversed(range(schedule.timesteps)):
        t = torch.full((shape[0],), step, device=device, dtype=torch.long)
        x0 = denoise_fn(x, t.float())
        if clip is not None:
            x0 = x0.clamp(*clip)
        mean = schedule.q_posterior_mean(x0, x, t)
        if step == 0:
            x = mean
            break
        var = schedule.at(var_name, t, x)
        noise = torch.randn(shape, generator=generator, device=device)
        x = mean + var.sqrt() * noise
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {"ancestral": ancestral}
