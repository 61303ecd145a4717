"""The VAE (Kingma & Welling 2014) on the latent-variable layer
(:mod:`~lightning_diffusion.models.latent_variable`, which also holds what it shares with the
hierarchical VAE: likelihoods, the KL schedule, ELBO and IWAE in bits/dim, gradient skipping).

Units: bits per data dimension, as in :mod:`~lightning_diffusion.models.latent_variable`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_diffusion import likelihoods as dist
from lightning_diffusion.likelihoods import normal_kl
from lightning_diffusion.models.latent_variable import Decoder, GradientSkip, LatentVariableModel  # noqa: F401 - importable from here as before
from lightning_diffusion.modes import evaluating
from lightning_diffusion.options import NonNegative


class VAE(LatentVariableModel):
    """Variational autoencoder (Kingma & Welling 2014): ``q(z | x) = N(mu(x), diag sigma^2(x))``,
    ``p(z) = N(0, I)``, ``p(x | z)`` a decoder likelihood (:class:`~lightning_diffusion.likelihoods.DecoderLikelihood`).

    ``ELBO = E_q[log p(x | z)] - KL(q(z | x) || N(0, I))`` with the KL in closed form
    (``0.5 sum(mu^2 + sigma^2 - log sigma^2 - 1)``) and one reparameterized sample. The training
    objective is ``recon + beta_t max(free_bits, KL_d)`` summed over latent dimensions d
    (Kingma et al. 2016's free bits, per dimension here), ``beta_t`` warmed up linearly.
    """

    data_nets = {"images": ("ConvVAENet", "ConvVAENet"), "points": ("MLPVAENet", "MLPVAENet")}

    free_bits_per_dimension = True
    fsdp_forward_methods = ("encode", "decode")

    def __init__(self, net: nn.Module, **kwargs: Any):
        """
        Args:
            net: encoder/decoder with ``encode(x) -> [B, 2 latent_dim]`` (mean, raw log-variance),
                ``decode(z) -> features`` and attributes ``latent_dim`` and ``out_features``:
                :class:`~lightning_diffusion.nets.ConvVAENet` (images) or
                :class:`~lightning_diffusion.nets.MLPVAENet` (points).
            **kwargs: the likelihood, KL and gradient-skip settings of :class:`LatentVariableModel`
                (defaults: Kingma & Welling, no clamping, no skipping) and the data facts and
                optimizer settings of :class:`GenerativeModel`.
        """
        super().__init__(**kwargs)
        self.save_hyperparameters_except("net")
        for attribute in ("encode", "decode", "latent_dim", "out_features"):
            if not hasattr(net, attribute):
                raise ValueError(f"VAE: the net {type(net).__name__} has no `{attribute}`; a VAE net needs encode(x), "
                                 "decode(z), latent_dim and out_features (see lightning_diffusion.nets.ConvVAENet)")
        self.net = net
        self.latent_dim = int(net.latent_dim)
        self.head = self._likelihood_head(int(net.out_features))

    # -- the model ------------------------------------------------------------------------------
    def _encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean, logvar)`` [B, latent_dim] of ``q(z | x)``."""
        return self._posterior(self.net.encode(x))

    def _decoder_params(self, z: Tensor) -> Tensor:
        return self.head(self.net.decode(z))

    def _elbo_terms(self, x: Tensor, generator: torch.Generator | None) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        mean, logvar = self._encode(x)
        z = dist.diagonal_gaussian_sample(mean, logvar, generator)
        log_px = self.likelihood.log_prob(x, self._decoder_params(z))
        zero = torch.zeros((), dtype=mean.dtype, device=mean.device)
        return log_px, [normal_kl(mean, logvar, zero, zero)], [mean]

    def _log_weights(self, x: Tensor, context: tuple[Tensor, Tensor], k: int,
                     generator: torch.Generator | None) -> Tensor:
        """``log p(x | z_k) + log N(z_k; 0, I) - log q(z_k | x)`` [k, B], nats, ``z_k ~ q(z | x)``."""
        mean, logvar = (t.unsqueeze(0).expand(k, *t.shape).reshape(-1, t.shape[1]) for t in context)
        z = dist.diagonal_gaussian_sample(mean, logvar, generator)
        x_rep = x.unsqueeze(0).expand(k, *x.shape).reshape(-1, *x.shape[1:])
        zero = torch.zeros((), dtype=z.dtype, device=z.device)
        log_w = (self.likelihood.log_prob(x_rep, self._decoder_params(z))
                 + dist.diagonal_gaussian_log_prob(z, zero, zero) - dist.diagonal_gaussian_log_prob(z, mean, logvar))
        return log_w.view(k, x.shape[0])

    # -- contract -------------------------------------------------------------------------------
    def sample(self, num_samples: int, *, y: Tensor | None = None, generator: torch.Generator | None = None,
               decoder: Decoder = "sample", temperature: NonNegative = 1.0, **options: Any) -> Tensor:
        """``z ~ N(0, temperature^2 I)``, then ``x ~ p(x | z)`` (``decoder="sample"``, on the 8-bit grid
        for images) or its mean (``decoder="mean"``); data space, images in [-1, 1]."""
        self.check_sample_options(decoder=decoder, temperature=temperature, **options)
        self._check_unconditional("VAE", y)
        with evaluating(self):
            z = temperature * torch.randn(num_samples, self.latent_dim, generator=generator, device=self.device)
            return self._decode_to_data(self._decoder_params(z), decoder, generator)

    # -- the first-stage interface (models/first_stage.py): LatentDiffusion over this VAE ------------
    @property
    def latent_shape(self) -> tuple[int, ...]:
        """``(latent_dim,)``: one sample's latent."""
        return (self.latent_dim,)

    #: continuous latents
    latent_categories = None

    def encode_latents(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``(z, nats [B])``: ``z ~ q(z | x)`` [B, latent_dim] and ``-log p(x | z) + log q(z | x)`` in nats,
        ``p(x | z)`` the decoder likelihood as :meth:`bits_per_dim` scores it (8-bit images as discrete
        data), so that ``-log p(x) <= nats - log p(z)`` for any prior ``p(z)`` (LSGM, Vahdat et al. 2021).
        With ``p(z) = N(0, I)`` this is the negative ELBO of one draw (its KL by Monte Carlo)."""
        mean, logvar = self._encode(x)
        z = dist.diagonal_gaussian_sample(mean, logvar, generator)
        log_px = self.likelihood.log_prob(x, self._decoder_params(z))
        return z, -log_px + dist.diagonal_gaussian_log_prob(z, mean, logvar)

    def sample_latents(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``z ~ q(z | x)`` [B, latent_dim] alone, the draw :meth:`encode_latents` makes with the same
        ``generator``: the encoder only (the decoder is most of encode_latents' cost)."""
        mean, logvar = self._encode(x)
        return dist.diagonal_gaussian_sample(mean, logvar, generator)

    def decode_latents(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The decoder's mean ``E[x | z]`` in data space (images in [-1, 1]) for latents z [B, latent_dim]:
        a point summary, as latent diffusion decodes; ``generator`` is not used."""
        return self.likelihood.mean(self._decoder_params(z))

    def reconstruct(self, x: Tensor, generator: torch.Generator | None = None, decoder: str = "mean") -> Tensor:
        """Decode ``z ~ q(z | x)``: the decoder's mean (or a sample with ``decoder="sample"``), data space."""
        with evaluating(self):
            mean, logvar = self._encode(x.to(self.device))
            z = dist.diagonal_gaussian_sample(mean, logvar, generator)
            return self._decode_to_data(self._decoder_params(z), decoder, generator)
