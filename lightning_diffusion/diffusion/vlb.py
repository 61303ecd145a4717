"""The variational bound of a DDPM (Ho et al. 2020, eq. 5; Nichol & Dhariwal 2021, sec. 2): its prior
term and its per-step terms. The Gaussian KL, the decoder likelihoods and the unit conversions it
uses are in :mod:`lightning_diffusion.likelihoods` (importable from here as before).

    L_vlb = L_T + sum_{t=2}^{T} L_{t-1} + L_0,
    L_T     = KL(q(x_T | x_0) || N(0, I)),
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)),
    L_0     = -log p_theta(x_0 | x_1).

``-log p(x_0) <= E_q[L_vlb]``. In our step indices (``i = t - 1`` in [0, T)), step 0 carries the
decoder term L_0 and step i >= 1 the KL term L_i. All values are in nats unless a name says bits;
"per sample" values are summed over the data dimensions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_diffusion.diffusion.schedules import NoiseSchedule
from lightning_diffusion.likelihoods.bits import LN2, nats_to_bits_per_dim, sum_over_dims  # noqa: F401 - as before
from lightning_diffusion.likelihoods.gaussian import (discretized_gaussian_log_likelihood, gaussian_log_likelihood,
                                                      normal_kl)


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
