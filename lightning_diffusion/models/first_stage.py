"""The first-stage interface of two-stage models (:class:`~lightning_diffusion.models.latent_diffusion.LatentDiffusion`):
a trained latent-variable model (``VAE``, ``HierarchicalVAE`` over its top group, ``VQVAE``) that encodes data into latents and decodes them back.

No Lightning and nothing of ours: the first stages (:mod:`~lightning_diffusion.models.vae`, the VQ-VAE) and
the latent-diffusion model both import it, so neither imports the other.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class FirstStage(Protocol):
    """A frozen first stage of a two-stage model.

    ``latent_shape``: the shape of one sample's latent (a VAE: ``(latent_dim,)``; an HVAE: its top group flattened; VQ: the code grid ``(h, w)``).
    ``latent_categories``: None for continuous latents (float); K for int64 codes in ``[0, K)`` (VQ).
    """

    latent_shape: tuple[int, ...]
    latent_categories: int | None

    def encode_latents(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``(z, first_stage_nats [B])``: z drawn from ``q(z | x)`` (VQ: the deterministic codes) and
        ``-log p(x | z) + log q(z | x)`` in nats per sample, x scored as the family's own ``bits_per_dim``
        scores it (8-bit images as discrete data), so that ``-log p(x) <= first_stage_nats - log p(z)``
        (LSGM's bound; VQ: ``log q = 0``, the encoder is deterministic)."""
        ...

    def sample_latents(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """z alone, the draw :meth:`encode_latents` makes with the same ``generator``, without scoring x:
        what training a prior needs each step (the decoder that scores x is most of a first stage's cost)."""
        ...

    def decode_latents(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Data-space samples (images in [-1, 1]) from latents z (each first stage says whether the
        decoder's mean or a draw)."""
        ...
