"""The latent-variable layer of the VAE and the hierarchical VAE: decoder likelihoods scored as
discrete data, beta / KL warm-up / free bits, the ELBO and the importance-weighted bound (Burda et
al. 2016) in bits/dim, gradient-update skipping, and active units.

Units. ``bits_per_dim`` and every logged ``loss``, ``nelbo``, ``recon``, ``kl`` and ``kl_group{i}``
are in bits per data dimension (nats / (D ln 2), D = C H W or the point dimension), so that
``recon + kl = nelbo`` and the numbers compare with the diffusion families'. ``train/loss`` is the
objective that is minimised (with beta, warm-up and free bits); ``val/loss`` is the plain negative
ELBO (beta = 1, no free bits) of one posterior sample per image.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Annotated, Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_diffusion import likelihoods as dist
from lightning_diffusion.likelihoods import LikelihoodName, nats_to_bits_per_dim, sum_over_dims
from lightning_diffusion.models.base import GenerativeModel, full_precision
from lightning_diffusion.modes import evaluating
from lightning_diffusion.options import Choices, PositiveInt

#: ``sample``'s ``decoder`` of both latent-variable families: a draw of the decoder or its mean
Decoder = Annotated[Literal["sample", "mean"], Choices("'sample' (x ~ p(x | z)) or 'mean' (its mean)")]


class GradientSkip:
    """Skip-an-update bookkeeping (VDVAE's ``skip_threshold``, made safe against stalling).

    An update is skipped when the global gradient norm is non-finite, or above the threshold:
    ``min(threshold, factor * median of the last window finite norms)`` (either part may be off).
    The median includes the norms of skipped updates, so a norm that drifts up for good moves the
    relative threshold with it within about half a window, instead of skipping every update forever
    as VDVAE's fixed threshold does once crossed. The fixed ``threshold`` keeps VDVAE's behaviour.
    The relative part starts after ``min_history`` norms. Pure bookkeeping: the model decides what a
    skip does; :meth:`state_dict` goes into checkpoints so a resumed run skips exactly as before.

    Args:
        threshold: fixed norm above which an update is skipped (VDVAE CIFAR-10: 400); None: off.
        factor: relative threshold: skip above ``factor`` times the running median; None: off.
        window: number of recent steps in the median and in the skip rate.
        warn_rate: warn when the skip rate over the last ``window`` steps exceeds this.
        min_history: norms needed before the relative threshold applies.
    """

    def __init__(self, threshold: float | None = None, factor: float | None = 10.0, window: int = 100,
                 warn_rate: float = 0.1, min_history: int = 20):
        if window < 1:
            raise ValueError(f"grad_skip_window must be >= 1, got {window}")
        if factor is not None and factor <= 1:
            raise ValueError(f"grad_skip_factor must be > 1 (a multiple of the median gradient norm), got {factor}")
        self.threshold, self.factor, self.window = threshold, factor, window
        self.warn_rate, self.min_history = warn_rate, min(min_history, window)
        self.norms: deque[float] = deque(maxlen=window)
        self.skipped: deque[bool] = deque(maxlen=window)
        self.total_steps = self.total_skips = 0
        self.last_warning_step = -window

    def current_threshold(self) -> float:
        """The norm above which the next update is skipped (inf: only non-finite norms are)."""
        limit = math.inf if self.threshold is None else self.threshold
        if self.factor is not None and len(self.norms) >= self.min_history:
            limit = min(limit, self.factor * statistics.median(self.norms))
        return limit

    def update(self, norm: float) -> bool:
        """Record one step's gradient norm; True if its update must be skipped."""
        finite = math.isfinite(norm)
        skip = not finite or norm > self.current_threshold()
        if finite:
            self.norms.append(norm)
        self.skipped.append(skip)
        self.total_steps += 1
        self.total_skips += int(skip)
        return skip

    @property
    def rate(self) -> float:
        """Fraction of the last ``window`` steps that were skipped."""
        return sum(self.skipped) / len(self.skipped) if self.skipped else 0.0

    def warning(self) -> str | None:
        """A message when the skip rate over a full window exceeds ``warn_rate`` (at most once per window)."""
        if len(self.skipped) < self.window or self.rate <= self.warn_rate \
                or self.total_steps - self.last_warning_step < self.window:
            return None
        self.last_warning_step = self.total_steps
        return (f"gradient skipping: {self.rate:.0%} of the last {self.window} updates were skipped "
                f"(bound {self.warn_rate:.0%}; {self.total_skips} of {self.total_steps} in all; threshold now "
                f"{self.current_threshold():.4g}, median norm {statistics.median(self.norms) if self.norms else math.nan:.4g}). "
                "Training is not progressing: lower the learning rate, raise grad_skip_threshold/grad_skip_factor, "
                "or check the data for NaN/Inf.")

    def state_dict(self) -> dict[str, Any]:
        return {"norms": list(self.norms), "skipped": list(self.skipped), "total_steps": self.total_steps,
                "total_skips": self.total_skips, "last_warning_step": self.last_warning_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.norms = deque(state["norms"], maxlen=self.window)
        self.skipped = deque(state["skipped"], maxlen=self.window)
        self.total_steps, self.total_skips = state["total_steps"], state["total_skips"]
        self.last_warning_step = state["last_warning_step"]


class LatentVariableModel(GenerativeModel):
    """Base of :class:`~lightning_diffusion.models.vae.VAE` and
    :class:`~lightning_diffusion.models.hvae.HierarchicalVAE`.

    A family implements ``_encode(x) -> context`` (what IWAE reuses over K), ``_elbo_terms(x,
    generator) -> (log p(x | z) [B], [KL of each group, elementwise], [posterior means of each
    group])`` for one posterior sample, ``_log_weights(x, context, k, generator) -> [k, B]`` (``log
    p(x, z_k) - log q(z_k | x)`` for k posterior draws), ``_decoder_params(features)`` and
    ``sample`` / ``reconstruct``. This base turns them into the training objective, the logged
    terms, bits/dim (ELBO or IWAE, chunked), active units and gradient skipping.
    """

    free_bits_per_dimension = False  # free bits per latent dimension (VAE) or per latent group (HVAE)

    #: options whose change makes the checkpoint's weights mean something else: a resume refuses them
    resume_fixed_hparams = ("data_shape", "likelihood", "num_mixtures", "decoder_std", "logvar_soft_clamp")

    def __init__(
        self,
        likelihood: LikelihoodName | None = None,
        num_mixtures: int = 10,
        decoder_std: float | None = None,
        beta: float = 1.0,
        kl_warmup_steps: int = 0,
        free_bits: float = 0.0,
        logvar_soft_clamp: float | None = None,
        grad_skip_threshold: float | None = None,
        grad_skip_factor: float | None = None,
        grad_skip_window: int = 100,
        grad_skip_warn_rate: float = 0.1,
        iwae_chunk_rows: int | None = None,
        active_unit_threshold: float = 0.01,
        **kwargs: Any,
    ):
        """
        Args:
            likelihood: decoder ``p(x | z)``: ``bernoulli`` (binarized data), ``gaussian`` (fixed
                ``decoder_std`` or learned), ``discretized_logistic`` (8-bit, IAF-VAE/PixelCNN++) or
                ``dmol`` (mixture of logistics with RGB coupling, PixelCNN++/NVAE/VDVAE). None:
                ``discretized_logistic`` for images, ``gaussian`` with a learned variance for points.
            num_mixtures: components of ``dmol`` (PixelCNN++, VDVAE: 10).
            decoder_std: ``gaussian`` only: a fixed standard deviation in data units; None learns it.
            beta: weight of the KL (1: the ELBO; beta-VAE, Higgins et al. 2017: > 1).
            kl_warmup_steps: the KL weight rises linearly from 0 to ``beta`` over these steps
                (Bowman et al. 2016; Sonderby et al. 2016); 0: no warm-up.
            free_bits: lambda of free bits (Kingma et al. 2016), nats per latent dimension (VAE) or per
                latent group (HVAE); 0: off.
            logvar_soft_clamp: soft-clamp the posterior log-variance to (-c, c) (``c tanh(x / c)``);
                None: off (Kingma & Welling).
            grad_skip_threshold: skip updates whose gradient norm exceeds this (VDVAE); None: off.
            grad_skip_factor: skip updates whose gradient norm exceeds this multiple of the median of
                the last ``grad_skip_window`` norms; None: off. With either on, non-finite gradients
                (a NaN batch) are skipped and counted instead of raising (see :class:`GradientSkip`).
            grad_skip_window: steps in the running median and in the logged skip rate.
            grad_skip_warn_rate: warn when more than this fraction of a window was skipped.
            iwae_chunk_rows: default ``chunk_rows`` of :meth:`bits_per_dim`.
            active_unit_threshold: a latent unit is active if the variance over the data of its
                posterior mean exceeds this (Burda et al.: 0.01).
            **kwargs: data facts and optimizer settings of :class:`GenerativeModel`.
        """
        super().__init__(**kwargs)
        if beta < 0 or free_bits < 0 or kl_warmup_steps < 0:
            raise ValueError(f"{type(self).__name__}: beta ({beta}), free_bits ({free_bits}) and kl_warmup_steps "
                             f"({kl_warmup_steps}) must be >= 0")
        if logvar_soft_clamp is not None and logvar_soft_clamp <= 0:
            raise ValueError(f"{type(self).__name__}: logvar_soft_clamp must be > 0 or None, got {logvar_soft_clamp}")
        shape = self.require_data_shape()
        if likelihood is None:
            likelihood = "discretized_logistic" if self.is_image else "gaussian"
        self.likelihood = dist.DecoderLikelihood(likelihood, shape[0], discrete=self.is_image,
                                                 num_mixtures=num_mixtures, fixed_std=decoder_std)
        self.beta, self.kl_warmup_steps, self.free_bits = beta, kl_warmup_steps, free_bits
        self.logvar_soft_clamp, self.iwae_chunk_rows = logvar_soft_clamp, iwae_chunk_rows
        self.active_unit_threshold = active_unit_threshold
        self.grad_skip = None
        if grad_skip_threshold is not None or grad_skip_factor is not None:
            self.grad_skip = GradientSkip(grad_skip_threshold, grad_skip_factor, grad_skip_window, grad_skip_warn_rate)
        self._unit_stats: list[list[Tensor]] | None = None

    def _likelihood_head(self, features: int) -> nn.Module:
        """The layer from the decoder's features to the likelihood's parameters (1x1 conv or Linear)."""
        channels = self.likelihood.param_channels
        return nn.Conv2d(features, channels, 1) if self.is_image else nn.Linear(features, channels)

    def _posterior(self, params: Tensor) -> tuple[Tensor, Tensor]:
        """``[mean, raw logvar]`` along dim 1 -> (mean, logvar), the log-variance soft-clamped."""
        mean, logvar = params.chunk(2, dim=1)
        return mean, dist.soft_clamp(logvar, self.logvar_soft_clamp)

    # -- family hooks -----------------------------------------------------------------------------
    def _encode(self, x: Tensor) -> Any:
        raise NotImplementedError

    def _elbo_terms(self, x: Tensor, generator: torch.Generator | None) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        raise NotImplementedError

    def _log_weights(self, x: Tensor, context: Any, k: int, generator: torch.Generator | None) -> Tensor:
        raise NotImplementedError

    # -- the objective --------------------------------------------------------------------------
    def kl_weight(self) -> float:
        """``beta * min(1, step / kl_warmup_steps)``: the KL's weight at the current global step."""
        if self.kl_warmup_steps <= 0:
            return self.beta
        return self.beta * min(1.0, self.global_step / self.kl_warmup_steps)

    def _free_bits_kl(self, kls: list[Tensor]) -> Tensor:
        """``sum_j max(free_bits, mean_batch KL_j)`` (Kingma et al. 2016), nats per sample; j runs over
        latent dimensions (VAE) or groups (HVAE). Without free bits, the batch mean of the KL."""
        if self.free_bits_per_dimension:
            groups = torch.cat([kl.flatten(1) for kl in kls], 1).mean(0)
        else:
            groups = torch.stack([sum_over_dims(kl).mean() for kl in kls])
        return groups.clamp(min=self.free_bits).sum() if self.free_bits > 0 else groups.sum()

    def _terms(self, batch: dict[str, Tensor], generator: torch.Generator | None) -> dict[str, Any]:
        x = batch["x"]
        log_px, kls, means = self._elbo_terms(x, generator)
        dims = x[0].numel()
        kl_groups = [sum_over_dims(kl) for kl in kls]
        recon, kl = -log_px, torch.stack(kl_groups).sum(0)
        if self.training:
            objective = recon.mean() + self.kl_weight() * self._free_bits_kl(kls)
        else:
            objective = (recon + kl).mean()
        bpd = lambda nats: nats_to_bits_per_dim(nats, dims)  # noqa: E731
        return {"loss": bpd(objective), "nelbo": bpd(recon + kl).mean(), "recon": bpd(recon).mean(),
                "kl": bpd(kl).mean(), "kl_groups": [bpd(k).mean() for k in kl_groups], "means": means}

    def loss(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> Tensor:
        """The objective in bits/dim: in training ``recon + beta_t * KL`` (with free bits), in eval mode
        the negative ELBO; both for one posterior sample per datum, averaged over the batch."""
        return self._terms(batch, generator)["loss"]

    def _log_terms(self, terms: dict[str, Any], split: str, batch_size: int) -> None:
        sync = split != "train"
        self.log(f"{split}/loss", terms["loss"], prog_bar=split != "test", sync_dist=sync, batch_size=batch_size)
        for key in ("nelbo", "recon", "kl"):
            self.log(f"{split}/{key}", terms[key], sync_dist=sync, batch_size=batch_size)
        if len(terms["kl_groups"]) > 1:
            for i, value in enumerate(terms["kl_groups"]):
                self.log(f"{split}/kl_group{i}", value, sync_dist=sync, batch_size=batch_size)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        terms = self._terms(batch, None)
        loss = terms["loss"]
        if self.grad_skip is None:
            self._checked(loss, "train", batch_idx)
        elif not torch.isfinite(loss):
            # gradient skipping is on: the non-finite gradient of this loss makes optimizer_step skip
            # the update (and count it), so the weights and the optimizer state stay as they were
            return loss
        self._log_terms(terms, "train", batch["x"].shape[0])
        self.log("train/beta", self.kl_weight(), batch_size=batch["x"].shape[0])
        return loss

    def _eval_step(self, batch: dict[str, Tensor], batch_idx: int, split: str) -> Tensor:
        generator = self.eval_generator(batch, batch_idx)
        terms = self._terms(batch, generator)
        self._checked(terms["loss"], split, batch_idx)
        self._log_terms(terms, split, batch["x"].shape[0])
        self._accumulate_units(terms["means"])
        return terms["loss"]

    # -- active units (Burda et al. 2016, sec. 5.2) ---------------------------------------------
    def _accumulate_units(self, means: list[Tensor]) -> None:
        flat = [m.detach().flatten(1).double() for m in means]
        if self._unit_stats is None:
            self._unit_stats = [[torch.zeros(f.shape[1], dtype=torch.float64, device=f.device) for _ in range(2)]
                                + [torch.zeros((), dtype=torch.float64, device=f.device)] for f in flat]
        for stats, f in zip(self._unit_stats, flat):
            stats[0] += f.sum(0)
            stats[1] += f.pow(2).sum(0)
            stats[2] += f.shape[0]

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._unit_stats = None

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self._unit_stats = None

    def active_units(self) -> list[int] | None:
        """Active latent units per group over the evaluation data seen since the epoch started: unit u
        is active if ``Cov_x(E_q[z_u | x]) > active_unit_threshold`` (Burda et al.: 0.01). Counts are
        summed over ranks. For the HVAE, ``E_q[z_u | x]`` is the posterior mean given one sample of the
        groups above."""
        if self._unit_stats is None:
            return None
        counts = []
        for total, squares, n in self._unit_stats:
            if self._trainer is not None and self._trainer.world_size > 1:
                total, squares, n = (self._trainer.strategy.reduce(t, reduce_op="sum") for t in (total, squares, n))
            mean = total / n
            variance = squares / n - mean.pow(2)
            counts.append(int((variance > self.active_unit_threshold).sum()))
        return counts

    def _log_active_units(self, split: str) -> None:
        counts = self.active_units()
        if counts is None:
            return
        self.log(f"{split}/active_units", float(sum(counts)), rank_zero_only=True)
        if len(counts) > 1:
            for i, c in enumerate(counts):
                self.log(f"{split}/active_units_group{i}", float(c), rank_zero_only=True)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self._log_active_units("val")

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self._log_active_units("test")

    # -- gradient skipping ------------------------------------------------------------------------
    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """Skip an update whose gradient norm is non-finite or above :class:`GradientSkip`'s threshold.

        How, and why this way: the closure (``training_step`` + ``backward``; under DDP the gradients
        are all-reduced in it, so every rank sees the same norm and decides alike) is run here, then
        the global norm of the unclipped gradients is checked (VDVAE checks before clipping). To skip,
        ``optimizer.step`` is simply not called: the parameters and the optimizer state (Adam's
        moments and step count) stay exactly as they were, which zeroing the gradients would not
        achieve (Adam would still decay its moments). Otherwise ``optimizer.step`` runs with a
        closure that returns the loss already computed, so Lightning's precision plugin still calls
        ``on_before_optimizer_step`` and clips the gradients (``grad_clip``) before the step. The
        LR scheduler and ``global_step`` advance either way (Lightning counts the step), so warm-up
        and ``max_steps`` count batches. For fp32/bf16; with ``16-mixed`` the GradScaler already skips
        non-finite steps and the norm would be of scaled gradients, so the threshold does not apply.
        """
        if self.grad_skip is None or optimizer_closure is None:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        loss = optimizer_closure()
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))) \
            if grads else 0.0
        skip = self.grad_skip.update(norm)
        self.log("train/grad_norm", norm)
        self.log("train/grad_skip_rate", self.grad_skip.rate)
        self.log("train/grad_skips", float(self.grad_skip.total_skips))
        message = self.grad_skip.warning()
        if message is not None:
            rank_zero_warn(f"{type(self).__name__} at global step {self.global_step}: {message}")
        if not skip:
            optimizer.step(closure=lambda: loss)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.grad_skip is not None:
            checkpoint["grad_skip"] = self.grad_skip.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.grad_skip is not None and "grad_skip" in checkpoint:
            self.grad_skip.load_state_dict(checkpoint["grad_skip"])

    # -- likelihood ---------------------------------------------------------------------------------
    def bpd_estimator(self, num_importance_samples: int = 1, **_: Any) -> str:
        """Name of what :meth:`bits_per_dim` returns with these options: ``elbo`` for K = 1,
        ``iwae-K`` otherwise."""
        return "elbo" if num_importance_samples == 1 else f"iwae-{num_importance_samples}"

    @full_precision
    def bits_per_dim(self, x: Tensor, num_importance_samples: PositiveInt = 1, *,
                     generator: torch.Generator | None = None, chunk_rows: PositiveInt | None = None,
                     **options: Any) -> Tensor:
        """An upper bound on ``-log p(x)`` of each sample, in bits/dim [B].

        K = 1: the negative ELBO ``-E_q[log p(x | z)] + KL(q(z | x) || p(z))`` with one posterior
        sample and the KL in closed form (per group given the groups above, for the HVAE).
        K > 1: the negative IWAE bound ``-log (1/K) sum_k p(x, z_k) / q(z_k | x)``, ``z_k ~ q(z | x)``
        (Burda et al. 2016), which tightens towards ``-log p(x)`` as K grows. 8-bit images are scored
        as discrete data (the decoder gives the probability of each pixel's bin), points by their
        density; D = elements of one sample.

        Args:
            x: data [B, ...] (images in [-1, 1] on the 8-bit grid).
            num_importance_samples: K.
            generator: source of the posterior noise; None: a generator seeded with ``val_seed``.
            chunk_rows: rows (datum x sample pairs) per forward pass; the K samples are evaluated in
                chunks with a running logsumexp, so memory stays that of one chunk. None:
                ``iwae_chunk_rows``, else the batch size B, so K = 1000 needs no more activation
                memory than K = 1.
        """
        self.check_bpd_options(num_importance_samples=num_importance_samples, chunk_rows=chunk_rows, **options)
        k_total = int(num_importance_samples)
        if self.is_image and (x.min() < -1 - 1e-6 or x.max() > 1 + 1e-6):
            raise ValueError(f"{type(self).__name__}.bits_per_dim: images must lie in [-1, 1] (8-bit values k / 127.5 - 1)")
        if generator is None:
            generator = torch.Generator(device=x.device).manual_seed(self.val_seed)
        rows = chunk_rows or self.iwae_chunk_rows or x.shape[0]
        with evaluating(self):
            out = []
            for xs in x.split(min(rows, x.shape[0])):
                if k_total == 1:
                    log_px, kls, _ = self._elbo_terms(xs, generator)
                    out.append(-(log_px - sum(sum_over_dims(kl) for kl in kls)))
                    continue
                context, running = self._encode(xs), dist.RunningLogMeanExp()
                per_chunk = max(1, rows // xs.shape[0])
                for start in range(0, k_total, per_chunk):
                    running.update(self._log_weights(xs, context, min(per_chunk, k_total - start), generator))
                out.append(-running.value())
        return nats_to_bits_per_dim(torch.cat(out), x[0].numel())

    def _decode_to_data(self, params: Tensor, decoder: str, generator: torch.Generator | None) -> Tensor:
        if decoder == "sample":
            return self.likelihood.sample(params, generator)
        if decoder == "mean":
            return self.likelihood.mean(params)
        raise ValueError(f"{type(self).__name__}: unknown decoder option {decoder!r}; choose 'sample' or 'mean'")

    @staticmethod
    def _check_unconditional(name: str, y: Tensor | None) -> None:
        if y is not None and bool((y != -1).any()):
            raise ValueError(f"{name}.sample: the model is unconditional; pass y=None")
