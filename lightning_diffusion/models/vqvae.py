"""The VQ-VAE (van den Oord et al. 2017) on the latent-variable layer
(:mod:`~lightning_diffusion.models.latent_variable`): a deterministic encoder to a grid of vectors,
each replaced by its nearest code of a codebook kept by exponential moving averages (the paper's
appendix; Razavi et al. 2019), a decoder likelihood of the data given the codes, and a uniform
prior over codes, which makes its bits/dim a valid bound on the NLL.

The bound. With ``q(c | x)`` the point mass on the encoder's codes ``c*(x)`` and ``p(c)`` uniform
over the ``K^(h w)`` code grids, ``p(x) = sum_c p(c) p(x | c) >= p(c*) p(x | c*)``, so
``-log p(x) <= -log p(x | c*) + h w log K``: the negative ELBO with ``KL(q || p) = h w log K``
(what ``kl`` logs). A stronger prior over the codes (a discrete diffusion, LatentDiffusion) replaces
``h w log K`` by its own bound on ``-log p(c*)``.

Why one optimizer and no GAN term: the codebook moves by EMA (buffers, not parameters) and the
encoder/decoder by the one AdamW of :class:`~lightning_diffusion.models.base.GenerativeModel`, so
Lightning's automatic optimization runs it; VQGAN's discriminator (two optimizers, manual
optimization) sharpens samples but adds no term to ``log p(x | c)``: the bound stays that of the
decoder likelihood, and a perceptual/adversarial loss would make the reported bits/dim describe a
model that was not trained for them.

Units: bits per data dimension, as in :mod:`~lightning_diffusion.models.latent_variable`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from lightning_diffusion.likelihoods import nats_to_bits_per_dim
from lightning_diffusion.models.base import full_precision
from lightning_diffusion.models.latent_variable import Decoder, LatentVariableModel
from lightning_diffusion.modes import evaluating
from lightning_diffusion.nets.codebook import EMACodebook, perplexity
from lightning_diffusion.options import PositiveInt


class VQVAE(LatentVariableModel):
    """Vector-quantized VAE (van den Oord et al. 2017) with an EMA codebook (Razavi et al. 2019):
    ``c = argmin_k ||z_e(x) - e_k||`` at each of the ``h x w`` positions, ``p(x | c)`` a decoder
    likelihood (:class:`~lightning_diffusion.likelihoods.DecoderLikelihood`) of ``decode(e_c)``, a
    uniform prior over codes.

    Training objective per sample: ``-log p(x | c) + commitment_cost ||z_e - sg(e_c)||^2`` (the
    squared error summed over the grid), the decoder's gradient passed to the encoder straight
    through the quantization (``z_e + sg(e_c - z_e)``); the codebook moves by EMA
    (:class:`~lightning_diffusion.nets.codebook.EMACodebook`), not by gradients. ``train/loss`` adds the constant ``h w log K``;
    ``val/loss`` is the bound of :meth:`bits_per_dim`. Logged besides the latent-variable layer's
    terms: ``{train,val}/perplexity`` (``exp H`` of the code usage: of the step's batch over all
    ranks, of the validation epoch) and ``{train,val}/codebook_usage`` (fraction of the K codes
    used there), ``train/commitment`` (bits/dim), ``train/dead_code_restarts`` (so far).

    It is also a first stage of latent diffusion: ``latent_shape`` (the code grid ``(h, w)``),
    ``latent_categories`` (K), :meth:`encode_latents` and :meth:`decode_latents`.
    """

    data_nets = {"images": ("ConvVQNet", "ConvVQNet")}
    fsdp_forward_methods = ("encode", "decode")
    resume_fixed_hparams = ("data_shape", "likelihood", "num_mixtures", "decoder_std", "num_codes")
    #: the latent-variable layer's options that have no meaning with a deterministic encoder and a
    #: constant KL, and their only accepted values (their defaults; the CLI passes them): others are
    #: refused rather than ignored
    _refused = {"beta": 1.0, "kl_warmup_steps": 0, "free_bits": 0.0, "logvar_soft_clamp": None}

    def __init__(self, net: nn.Module, num_codes: int = 512, commitment_cost: float = 0.25,
                 ema_decay: float = 0.99, ema_epsilon: float = 1e-5, dead_code_steps: int = 100,
                 restart_seed: int = 0, **kwargs: Any):
        """
        Args:
            net: encoder/decoder with ``encode(x) -> [B, code_dim, h, w]``, ``decode(e) -> features
                [B, out_features, H, W]`` and attributes ``code_dim``, ``latent_size`` (h = w) and
                ``out_features``: :class:`~lightning_diffusion.nets.ConvVQNet`.
            num_codes: K, the codebook's size (van den Oord et al.: 512).
            commitment_cost: beta of the commitment loss ``||z_e - sg(e)||^2`` (0.25).
            ema_decay: decay of the codebook's moving averages (Razavi et al.: 0.99).
            ema_epsilon: Laplace smoothing of the code counts.
            dead_code_steps: a code unused on every rank for this many training steps is restarted
                at a random encoder output; 0: never.
            restart_seed: seed of the restart generator (its state is kept in the checkpoint).
            **kwargs: the likelihood and gradient-skip settings of :class:`LatentVariableModel`
                (not ``beta``, ``kl_warmup_steps``, ``free_bits``, ``logvar_soft_clamp``: the encoder
                is deterministic and the KL a constant) and the data facts and optimizer settings
                of :class:`GenerativeModel`.
        """
        refused = [f"{name}={kwargs[name]!r}" for name, default in self._refused.items()
                   if name in kwargs and kwargs[name] != default]
        if refused:
            raise ValueError(f"VQVAE has no option {', '.join(refused)}: its encoder is deterministic and its KL "
                             "(h w log K under the uniform prior) a constant; remove it from model.init_args")
        super().__init__(**kwargs)
        self.save_hyperparameters_except("net")
        if not self.is_image:
            raise ValueError(f"VQVAE takes images [C, H, W]; the data have shape {self.data_shape}")
        for attribute in ("encode", "decode", "code_dim", "latent_size", "out_features"):
            if not hasattr(net, attribute):
                raise ValueError(f"VQVAE: the net {type(net).__name__} has no `{attribute}`; a VQ-VAE net needs "
                                 "encode(x), decode(e), code_dim, latent_size and out_features (see ConvVQNet)")
        if num_codes < 2:
            raise ValueError(f"VQVAE: num_codes must be >= 2, got {num_codes}")
        if commitment_cost < 0 or not 0 <= ema_decay < 1 or ema_epsilon <= 0 or dead_code_steps < 0:
            raise ValueError(f"VQVAE: need commitment_cost >= 0 ({commitment_cost}), 0 <= ema_decay < 1 "
                             f"({ema_decay}), ema_epsilon > 0 ({ema_epsilon}), dead_code_steps >= 0 ({dead_code_steps})")
        self.net = net
        self.num_codes, self.commitment_cost = int(num_codes), commitment_cost
        self.codebook = EMACodebook(self.num_codes, int(net.code_dim), ema_decay, ema_epsilon, dead_code_steps,
                                    restart_seed)
        self.head = self._likelihood_head(int(net.out_features))
        self._eval_counts: Tensor | None = None

    # -- the first-stage interface ------------------------------------------------------------
    @property
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one sample's latent: the code grid ``(h, w)``."""
        return (int(self.net.latent_size), int(self.net.latent_size))

    @property
    def latent_categories(self) -> int:
        """K: latents are int64 codes in ``[0, K)``."""
        return self.num_codes

    @property
    def prior_nats(self) -> float:
        """``-log p(c) = h w log K`` under the uniform prior, nats per sample."""
        return math.prod(self.latent_shape) * math.log(self.num_codes)

    def _quantize(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(encoder output z_e [B, D, h, w], codes [B, h, w], code vectors e_c [B, D, h, w])."""
        z_e = self.net.encode(x)
        flat = z_e.movedim(1, -1).reshape(-1, z_e.shape[1])
        codes = self.codebook.quantize(flat).view(z_e.shape[0], *z_e.shape[2:])
        return z_e, codes, self.codebook.lookup(codes).movedim(-1, 1).to(z_e.dtype)

    def _decoder_params(self, e: Tensor) -> Tensor:
        return self.head(self.net.decode(e))

    def encode_latents(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``(codes, first_stage_nats)``: the encoder's codes, int64 [B, h, w] (deterministic, so
        ``generator`` is unused), and ``-log p(x | codes)`` [B] in nats (``log q = 0``), 8-bit
        images scored as discrete data; ``-log p(x) <= first_stage_nats - log p(codes)``."""
        with evaluating(self):
            _, codes, e = self._quantize(x.to(self.device))
            return codes, -self.likelihood.log_prob(x.to(self.device), self._decoder_params(e))

    def sample_latents(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The encoder's codes, int64 [B, h, w], alone (those of :meth:`encode_latents`; no decoder)."""
        with evaluating(self):
            return self._quantize(x.to(self.device))[1]

    def decode_latents(self, z: Tensor, generator: torch.Generator | None = None, decoder: Decoder = "sample") -> Tensor:
        """Images in [-1, 1] from codes ``z`` int64 [B, h, w]: a draw ``x ~ p(x | z)`` on the 8-bit
        grid (``decoder="sample"``, the generative process the bound scores) or its mean
        (``decoder="mean"``)."""
        if z.shape[1:] != self.latent_shape:
            raise ValueError(f"VQVAE.decode_latents: codes of shape {tuple(z.shape)}; expected [B, {', '.join(map(str, self.latent_shape))}]")
        with evaluating(self):
            e = self.codebook.lookup(z.to(self.device)).movedim(-1, 1)
            return self._decode_to_data(self._decoder_params(e), decoder, generator)

    # -- the objective --------------------------------------------------------------------------
    def _terms(self, batch: dict[str, Tensor], generator: torch.Generator | None) -> dict[str, Any]:
        x = batch["x"]
        z_e, codes, e = self._quantize(x)
        if self.training:
            counts = self.codebook.update(z_e.movedim(1, -1).reshape(-1, z_e.shape[1]), codes.flatten())
        else:
            counts = torch.bincount(codes.flatten(), minlength=self.num_codes).float()
        straight_through = z_e + (e - z_e).detach()
        recon = -self.likelihood.log_prob(x, self._decoder_params(straight_through))
        commitment = self.commitment_cost * (z_e - e.detach()).pow(2).flatten(1).sum(1)
        kl = torch.full_like(recon, self.prior_nats)
        objective = (recon + kl + commitment).mean() if self.training else (recon + kl).mean()
        bpd = lambda nats: nats_to_bits_per_dim(nats, x[0].numel())  # noqa: E731
        return {"loss": bpd(objective), "nelbo": bpd(recon + kl).mean(), "recon": bpd(recon).mean(),
                "kl": bpd(kl).mean(), "kl_groups": [], "means": [e.detach()],
                "commitment": bpd(commitment).mean(), "counts": counts}

    def _log_terms(self, terms: dict[str, Any], split: str, batch_size: int) -> None:
        super()._log_terms(terms, split, batch_size)
        counts = terms["counts"]
        if split == "train":
            self.log("train/commitment", terms["commitment"], batch_size=batch_size)
            self.log("train/perplexity", perplexity(counts).float(), batch_size=batch_size)
            self.log("train/codebook_usage", (counts > 0).float().mean(), batch_size=batch_size)
            self.log("train/dead_code_restarts", self.codebook.restarts.float(), batch_size=batch_size)
        else:
            self._eval_counts = counts if self._eval_counts is None else self._eval_counts + counts

    def _log_code_usage(self, split: str) -> None:
        """``{split}/perplexity`` and ``{split}/codebook_usage`` of the epoch's codes, summed over ranks."""
        counts, self._eval_counts = self._eval_counts, None
        if counts is None:
            return
        if self._trainer is not None and self._trainer.world_size > 1:
            counts = self._trainer.strategy.reduce(counts, reduce_op="sum")
        self.log(f"{split}/perplexity", perplexity(counts).float())
        self.log(f"{split}/codebook_usage", (counts > 0).float().mean())

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self._log_code_usage("val")

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self._log_code_usage("test")

    def on_fit_start(self) -> None:
        """After a resume's restore, before the sanity check and the first step: every rank takes rank
        0's codebook (FSDP2 broadcasts no buffers;
        :meth:`~lightning_diffusion.nets.codebook.EMACodebook.broadcast_from_rank_zero`), so the
        all-reduced EMA updates keep one codebook on all ranks."""
        super().on_fit_start()
        self.codebook.broadcast_from_rank_zero()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["vq_restart_rng"] = self.codebook.generator.get_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if "vq_restart_rng" in checkpoint:
            self.codebook.generator.set_state(checkpoint["vq_restart_rng"])

    # -- likelihood ---------------------------------------------------------------------------------
    def bpd_estimator(self, **_: Any) -> str:
        """``vq-uniform-prior``: ``-log p(x | c*) + h w log K``, exact for the encoder's codes."""
        return "vq-uniform-prior"

    @full_precision
    def bits_per_dim(self, x: Tensor, *, generator: torch.Generator | None = None,
                     chunk_rows: PositiveInt | None = None, **options: Any) -> Tensor:
        """An upper bound on ``-log p(x)`` of each image, in bits/dim [B]: ``(-log p(x | c*(x)) + h w
        log K) / (D ln 2)``, the decoder's discrete likelihood of the encoder's codes plus their cost
        under the uniform prior over the K codes (``p(x) >= p(c*) p(x | c*)``; module docstring).
        Deterministic: ``generator`` is unused.

        Args:
            x: images [B, C, H, W] in [-1, 1] on the 8-bit grid.
            generator: unused (the encoder is deterministic); the contract's argument.
            chunk_rows: images per forward pass (None: the whole batch).
        """
        self.check_bpd_options(chunk_rows=chunk_rows, **options)
        if x.min() < -1 - 1e-6 or x.max() > 1 + 1e-6:
            raise ValueError("VQVAE.bits_per_dim: images must lie in [-1, 1] (8-bit values k / 127.5 - 1)")
        nats = torch.cat([self.encode_latents(xs)[1] for xs in x.split(chunk_rows or x.shape[0])])
        return nats_to_bits_per_dim(nats + self.prior_nats, x[0].numel())

    # -- contract -------------------------------------------------------------------------------
    def sample(self, num_samples: int, *, y: Tensor | None = None, generator: torch.Generator | None = None,
               decoder: Decoder = "sample", **options: Any) -> Tensor:
        """Codes uniform over the K codes at each position (the prior the bound uses), then ``x ~
        p(x | c)`` (``decoder="sample"``) or its mean; images in [-1, 1]. A uniform prior ignores the
        structure of the code grids: a prior trained on them (LatentDiffusion) samples digits."""
        self.check_sample_options(decoder=decoder, **options)
        self._check_unconditional("VQVAE", y)
        codes = torch.randint(self.num_codes, (num_samples, *self.latent_shape), generator=generator,
                              device=generator.device if generator is not None else self.device)
        return self.decode_latents(codes.to(self.device), generator, decoder)

    def reconstruct(self, x: Tensor, generator: torch.Generator | None = None, decoder: str = "mean") -> Tensor:
        """Decode the encoder's codes: the decoder's mean (or a draw with ``decoder="sample"``), data space."""
        codes, _ = self.encode_latents(x)
        return self.decode_latents(codes, generator, decoder)
