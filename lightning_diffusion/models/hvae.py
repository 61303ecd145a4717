"""The hierarchical VAE with top-down inference (Ladder VAE, Sonderby et al. 2016; IAF-VAE, Kingma
et al. 2016; NVAE, Vahdat & Kautz 2020; VDVAE, Child 2021).

``p(z) = prod_i p(z_i | z_<i)``, ``q(z | x) = prod_i q(z_i | x, z_<i)``: a bottom-up pass over x,
then one top-down pass whose residual cells serve both the prior and the posterior of every
latent group. ``ELBO = E_q[log p(x | z)] - sum_i E_q[KL(q(z_i | x, z_<i) || p(z_i | z_<i))]``,
each group's KL in closed form given a sample of the groups above it.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from lightning_diffusion import likelihoods as dist
from lightning_diffusion.likelihoods import normal_kl
from lightning_diffusion.errors import OptionError
from lightning_diffusion.models.latent_variable import Decoder, LatentVariableModel
from lightning_diffusion.modes import evaluating
from lightning_diffusion.options import check_number


class HierarchicalVAE(LatentVariableModel):
    """Hierarchical VAE over a ladder net (:class:`~lightning_diffusion.nets.LadderVAENet`).

    Logs the KL of every group (``train/kl_group{i}``, bits/dim) and, after each validation epoch,
    the active units per group (``val/active_units_group{i}``) and in all (``val/active_units``).
    Log-variances of prior and posterior are soft-clamped (``c tanh(x / c)``); updates with a
    non-finite or outlying gradient norm are skipped and counted (:class:`~lightning_diffusion.models.latent_variable.GradientSkip`).

    It is also a first stage of latent diffusion over its top latent group (``latent_shape``,
    :meth:`encode_latents`, :meth:`decode_latents`): the prior replaces ``p(z_top)``, the groups below
    stay the HVAE's.
    """

    data_nets = {"images": ("LadderVAENet", "LadderVAENet")}

    fsdp_forward_methods = ("bottom_up", "top_down")

    def __init__(self, net: nn.Module, logvar_soft_clamp: float | None = 10.0, grad_skip_factor: float | None = 10.0,
                 **kwargs: Any):
        """
        Args:
            net: a ladder net with ``bottom_up(x)``, ``top_down(activations, latent_fn, batch_size)``,
                ``group_shapes`` and ``out_features`` (:class:`~lightning_diffusion.nets.LadderVAENet`).
            logvar_soft_clamp: soft clamp of the prior and posterior log-variances to (-c, c)
                (NVAE's ``soft_clamp5`` on log sigma is c = 10 on the log-variance).
            grad_skip_factor: skip updates whose gradient norm exceeds this multiple of the running
                median (see :class:`~lightning_diffusion.models.latent_variable.GradientSkip`; VDVAE's fixed
                threshold is ``grad_skip_threshold``); None with no threshold: no skipping.
            **kwargs: the likelihood, KL and gradient-skip settings of
                :class:`~lightning_diffusion.models.latent_variable.LatentVariableModel`, and the data facts and
                optimizer settings of :class:`~lightning_diffusion.models.base.GenerativeModel`.
        """
        super().__init__(logvar_soft_clamp=logvar_soft_clamp, grad_skip_factor=grad_skip_factor, **kwargs)
        self.save_hyperparameters_except("net")
        for attribute in ("bottom_up", "top_down", "group_shapes", "out_features"):
            if not hasattr(net, attribute):
                raise ValueError(f"HierarchicalVAE: the net {type(net).__name__} has no `{attribute}`; see "
                                 "lightning_diffusion.nets.LadderVAENet")
        if not self.is_image:
            raise ValueError(f"HierarchicalVAE models images [C, H, W]; data_shape is {self.data_shape}. "
                             "Use VAE with MLPVAENet for points")
        self.net = net
        self.num_groups = len(net.group_shapes)
        self.head = self._likelihood_head(int(net.out_features))

    def _clamped(self, params: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        mean, logvar = params
        return mean, dist.soft_clamp(logvar, self.logvar_soft_clamp)

    # -- the model ------------------------------------------------------------------------------
    def _encode(self, x: Tensor) -> dict[int, Tensor]:
        """The bottom-up activations of x (reused by every importance sample)."""
        return self.net.bottom_up(x)

    def _elbo_terms(self, x: Tensor, generator: torch.Generator | None) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        kls, means = [], []

        def posterior_sample(group: int, prior: tuple[Tensor, Tensor], posterior: tuple[Tensor, Tensor] | None) -> Tensor:
            (prior_mean, prior_logvar), (mean, logvar) = self._clamped(prior), self._clamped(posterior)
            kls.append(normal_kl(mean, logvar, prior_mean, prior_logvar))
            means.append(mean)
            return dist.diagonal_gaussian_sample(mean, logvar, generator)

        features = self.net.top_down(self._encode(x), posterior_sample, x.shape[0])
        return self.likelihood.log_prob(x, self.head(features)), kls, means

    def _log_weights(self, x: Tensor, context: dict[int, Tensor], k: int,
                     generator: torch.Generator | None) -> Tensor:
        """``log p(x | z) + sum_i [log p(z_i | z_<i) - log q(z_i | x, z_<i)]`` [k, B], nats, for k draws
        of the whole hierarchy from q."""
        batch = x.shape[0]
        activations = {r: a.repeat(k, 1, 1, 1) for r, a in context.items()}  # row s * B + b: sample s of datum b
        log_ratio = torch.zeros(k * batch, dtype=x.dtype, device=x.device)

        def posterior_sample(group: int, prior: tuple[Tensor, Tensor], posterior: tuple[Tensor, Tensor] | None) -> Tensor:
            nonlocal log_ratio
            (prior_mean, prior_logvar), (mean, logvar) = self._clamped(prior), self._clamped(posterior)
            z = dist.diagonal_gaussian_sample(mean, logvar, generator)
            log_ratio = log_ratio + dist.diagonal_gaussian_log_prob(z, prior_mean, prior_logvar) \
                - dist.diagonal_gaussian_log_prob(z, mean, logvar)
            return z

        features = self.net.top_down(activations, posterior_sample, k * batch)
        log_px = self.likelihood.log_prob(x.repeat(k, *([1] * (x.ndim - 1))), self.head(features))
        return (log_px + log_ratio).view(k, batch)

    def temperatures(self, temperature: float | Sequence[float]) -> list[float]:
        """One temperature per latent group from a float or a list of ``num_groups`` floats."""
        self._check_temperature(temperature)
        if isinstance(temperature, (int, float)):
            return [float(temperature)] * self.num_groups
        return [float(t) for t in temperature]

    def _check_temperature(self, temperature: Any) -> None:
        if isinstance(temperature, (list, tuple)):
            if len(temperature) != self.num_groups:
                raise OptionError("temperature", temperature, f"has {len(temperature)} entries but the model has "
                                  f"{self.num_groups} latent groups", "give one float or one per group")
            for t in temperature:
                check_number("temperature", t, least=0)
        else:
            check_number("temperature", temperature, least=0)

    def check_option_rules(self, options: dict[str, Any]) -> None:
        """``temperature``: one number >= 0, or one per latent group (a signature cannot count them)."""
        if "temperature" in options:
            self._check_temperature(options["temperature"])

    # -- contract -------------------------------------------------------------------------------
    def sample(self, num_samples: int, *, y: Tensor | None = None, generator: torch.Generator | None = None,
               decoder: Decoder = "sample", temperature: float | Sequence[float] = 1.0, **options: Any) -> Tensor:
        """Ancestral samples: ``z_i ~ N(mu_i, (t_i sigma_i)^2)`` of ``p(z_i | z_<i)`` top to bottom with
        temperature ``t_i`` (a float for all groups or one per group; NVAE/VDVAE sample at t < 1
        for cleaner images), then ``x ~ p(x | z)`` (``decoder="sample"``, 8-bit grid) or its mean
        (``decoder="mean"``). Images in [-1, 1]."""
        self.check_sample_options(decoder=decoder, temperature=temperature, **options)
        self._check_unconditional("HierarchicalVAE", y)
        temps = self.temperatures(temperature)

        def prior_sample(group: int, prior: tuple[Tensor, Tensor], posterior: tuple[Tensor, Tensor] | None) -> Tensor:
            mean, logvar = self._clamped(prior)
            return dist.diagonal_gaussian_sample(mean, logvar, generator, temps[group])

        with evaluating(self):
            features = self.net.top_down(None, prior_sample, num_samples)
            return self._decode_to_data(self.head(features), decoder, generator)

    # -- the first-stage interface (models/first_stage.py): LatentDiffusion over the top group ------------
    @property
    def latent_shape(self) -> tuple[int, ...]:
        """``(C r r,)``: the top latent group (``group_shapes[0]``) of one sample, flattened to a vector
        (the groups below it are part of the first stage)."""
        return (math.prod(self.net.group_shapes[0]),)

    #: continuous latents
    latent_categories = None

    def encode_latents(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``(z_top, nats [B])``: every group drawn from its posterior, the top one returned flattened
        [B, latent_shape], and ``-log p(x | z) + log q(z_top | x) - sum_{i > 0} [log p(z_i | z_<i) -
        log q(z_i | x, z_<i)]`` in nats (8-bit images as discrete data), so that ``-log p(x) <= nats -
        log p(z_top)`` for any prior of the top group (LSGM's bound with the lower groups in the first
        stage). With the model's own top prior it is the negative ELBO of one draw, every KL by Monte Carlo."""
        nats = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        top: list[Tensor] = []

        def posterior_sample(group: int, prior: tuple[Tensor, Tensor], posterior: tuple[Tensor, Tensor] | None) -> Tensor:
            nonlocal nats
            (prior_mean, prior_logvar), (mean, logvar) = self._clamped(prior), self._clamped(posterior)
            z = dist.diagonal_gaussian_sample(mean, logvar, generator)
            nats = nats + dist.diagonal_gaussian_log_prob(z, mean, logvar)
            if group:
                nats = nats - dist.diagonal_gaussian_log_prob(z, prior_mean, prior_logvar)
            else:
                top.append(z.flatten(1))
            return z

        features = self.net.top_down(self._encode(x), posterior_sample, x.shape[0])
        return top[0], nats - self.likelihood.log_prob(x, self.head(features))

    def sample_latents(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``z_top ~ q(z_top | x)`` [B, latent_shape] alone, the draw :meth:`encode_latents` makes with the same
        ``generator``: the bottom-up pass and the top group only (no lower groups, no decoder)."""
        top: list[Tensor] = []

        def posterior_sample(group: int, prior: tuple[Tensor, Tensor], posterior: tuple[Tensor, Tensor] | None) -> Tensor:
            mean, logvar = self._clamped(posterior)
            top.append(dist.diagonal_gaussian_sample(mean, logvar, generator))
            return top[-1]

        self.net.top_down(self._encode(x), posterior_sample, x.shape[0], groups=1)
        return top[0].flatten(1)

    def decode_latents(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images in [-1, 1] from top latents z [B, latent_shape]: the groups below drawn from their priors
        ``p(z_i | z_<i)`` (with ``generator``), then the decoder's mean."""
        if z.shape[1:] != self.latent_shape:
            raise ValueError(f"HierarchicalVAE.decode_latents: latents of shape {tuple(z.shape)}; expected "
                             f"[B, {self.latent_shape[0]}] (the top group {self.net.group_shapes[0]}, flattened)")

        def prior_sample(group: int, prior: tuple[Tensor, Tensor], posterior: tuple[Tensor, Tensor] | None) -> Tensor:
            if not group:
                return z.to(prior[0].dtype).view(-1, *self.net.group_shapes[0])
            mean, logvar = self._clamped(prior)
            return dist.diagonal_gaussian_sample(mean, logvar, generator)

        features = self.net.top_down(None, prior_sample, z.shape[0])
        return self.likelihood.mean(self.head(features))

    def reconstruct(self, x: Tensor, generator: torch.Generator | None = None, decoder: str = "mean") -> Tensor:
        """Decode ``z ~ q(z | x)`` (every group from its posterior): the decoder's mean, or a sample
        with ``decoder="sample"``; images in [-1, 1]."""
        with evaluating(self):
            x = x.to(self.device)

            def posterior_sample(group, prior, posterior):
                mean, logvar = self._clamped(posterior)
                return dist.diagonal_gaussian_sample(mean, logvar, generator)

            features = self.net.top_down(self._encode(x), posterior_sample, x.shape[0])
            return self._decode_to_data(self.head(features), decoder, generator)
