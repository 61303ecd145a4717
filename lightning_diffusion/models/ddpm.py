"""DDPM (Ho et al. 2020) with the improvements of Nichol & Dhariwal 2021: the simple or hybrid loss,
a learned reverse variance, min-SNR weighting, classifier-free guidance and the full variational
bound in bits/dim."""

from __future__ import annotations

import typing
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_diffusion.diffusion import parameterization as param
from lightning_diffusion.diffusion import vlb
from lightning_diffusion.diffusion.parameterization import DDPMParameterization
from lightning_diffusion.diffusion.schedules import BetaSchedule, NoiseSchedule, Variance
from lightning_diffusion.diffusion.samplers import check_steps
from lightning_diffusion.diffusion.sde import DiscreteVP
from lightning_diffusion.models.base import full_precision
from lightning_diffusion.models.gaussian_diffusion import AIS_ESTIMATOR, AIS_OPTIONS, GaussianDiffusionModel, uniform_steps
from lightning_diffusion.modes import evaluating
from lightning_diffusion.options import Positive, PositiveInt

LossType = Literal["simple", "hybrid"]


class DDPM(GaussianDiffusionModel):
    """Denoising diffusion probabilistic model over any data shape.

    The net is called as ``net(x_t, t, y)`` with ``t`` the integer step index in ``[0, T)`` as
    float, and predicts ``eps``, ``x0``, ``v`` or an ``energy`` (``parameterization``, a row of
    :mod:`~lightning_diffusion.diffusion.parameterization`). The one schedule object is
    :attr:`process`, a :class:`DiscreteVP` holding the :class:`NoiseSchedule` (:attr:`schedule`) that
    the ancestral sampler and the bound use.

    Losses (per element means, then over the batch):

    - ``simple`` (Ho et al. eq. 14): ``L_simple = E_{t, x0, eps} w_t || target - net(x_t, t) ||^2``
      with ``w_t = 1``, or the min-SNR-gamma weight (Hang et al. 2023) with ``min_snr_gamma``.
    - ``hybrid`` (Nichol & Dhariwal eq. 16): ``L_simple + lambda L_vlb``. The net outputs 2C
      channels: the prediction and ``v`` that interpolates the log-variance between
      beta-tilde_t and beta_t (their eq. 15). ``L_vlb = sum_t L_t`` is estimated by ``T L_t`` at
      the drawn t, in bits/dim, with the mean's gradient stopped so that it trains only the
      variance (as improved-diffusion, whose ``lambda T = T / 1000``).
    """

    #: options whose change makes the checkpoint's weights mean something else: a resume refuses them
    resume_fixed_hparams = ("data_shape", "timesteps", "beta_schedule", "parameterization", "class_conditional", "label_attributes")

    def __init__(
        self,
        net: nn.Module,
        timesteps: int = 1000,
        beta_schedule: BetaSchedule = "linear",
        parameterization: DDPMParameterization = "eps",
        variance: Variance = "fixedlarge",
        class_conditional: bool = False,
        label_dropout: float = 0.1,
        loss_type: LossType = "simple",
        vlb_weight: float = 0.001,
        min_snr_gamma: float | None = None,
        **kwargs: Any,
    ):
        """
        Args:
            net: denoising network ``net(x, t, y=None) -> Tensor`` with the shape of x (2C channels
                with ``loss_type="hybrid"``).
            timesteps: number of diffusion steps T (Ho et al.: 1000).
            beta_schedule: ``linear`` (Ho et al.) or ``cosine`` (Nichol & Dhariwal).
            parameterization: what the net predicts: ``eps`` (noise), ``x0`` (clean data),
                ``v`` (velocity, Salimans & Ho) or ``energy`` (one number per sample, whose gradient
                is the noise: the net an :class:`~lightning_diffusion.EnergyHead`).
            variance: fixed reverse-process variance, used in ancestral sampling and, unless the
                variance is learned, in the bound: ``fixedlarge`` (beta_t) or ``fixedsmall``
                (posterior variance beta-tilde_t).
            class_conditional: feed the labels ``y`` of the batch to the net.
            label_dropout: with ``class_conditional``, the probability of replacing a label by the
                null label -1 in training (classifier-free guidance, Ho & Salimans 2022).
            loss_type: ``simple`` (Ho et al.) or ``hybrid`` (Nichol & Dhariwal: learns the
                variance; the net must have ``out_channels = 2 C``).
            vlb_weight: lambda of the hybrid loss (Nichol & Dhariwal: 0.001).
            min_snr_gamma: weight the MSE by min-SNR-gamma (Hang et al. 2023 recommend 5);
                None: unweighted.
            **kwargs: data facts and optimizer settings of
                :class:`~lightning_diffusion.models.base.GenerativeModel`.
        """
        super().__init__(class_conditional=class_conditional, label_dropout=label_dropout, **kwargs)
        self.save_hyperparameters_except("net")
        for name, value, choices in (("parameterization", parameterization, typing.get_args(DDPMParameterization)),
                                     ("variance", variance, ("fixedlarge", "fixedsmall")),
                                     ("loss_type", loss_type, ("simple", "hybrid"))):
            if value not in choices:
                raise ValueError(f"DDPM: unknown {name} {value!r}; choose one of {', '.join(map(repr, choices))}")
        if min_snr_gamma is not None and min_snr_gamma <= 0:
            raise ValueError(f"DDPM: min_snr_gamma must be > 0 (Hang et al. use 5) or None, got {min_snr_gamma}")
        self.net = net
        self.process = DiscreteVP(NoiseSchedule(beta_schedule, timesteps))
        self.parameterization, self.variance = parameterization, variance
        self.loss_type, self.vlb_weight, self.min_snr_gamma = loss_type, vlb_weight, min_snr_gamma
        self.learn_sigma = loss_type == "hybrid"
        if self.learn_sigma and param.row(parameterization).energy_scale is not None:
            raise ValueError(f"DDPM: loss_type='hybrid' learns the variance from C more output channels, but with "
                             f"parameterization={parameterization!r} the net outputs one energy per sample; "
                             "use loss_type: simple")
        out_channels = getattr(net, "out_channels", None)
        if self.learn_sigma and self.data_shape is not None and isinstance(out_channels, int) \
                and out_channels != 2 * self.data_shape[0]:
            raise ValueError(f"DDPM(loss_type='hybrid') learns the variance: the net must output 2 x "
                             f"{self.data_shape[0]} channels, but its out_channels is {out_channels}; "
                             f"build it with out_channels={2 * self.data_shape[0]}")

    @property
    def schedule(self) -> NoiseSchedule:
        """The DDPM noise schedule (betas, posterior) of :attr:`process`."""
        return self.process.schedule

    # -- the net's output ----------------------------------------------------------------------
    def split_output(self, output: Tensor, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(prediction, v): the net's prediction in ``parameterization`` and, with a learned
        variance, the interpolation ``v`` (nominally in [-1, 1]; not clamped, as improved-diffusion)."""
        channels = x.shape[1]
        if not self.learn_sigma:
            if output.shape != x.shape:
                raise ValueError(f"DDPM: the net returned shape {tuple(output.shape)} for x of shape {tuple(x.shape)}; "
                                 f"with loss_type='simple' it must output the shape of x (out_channels={channels})")
            return output, None
        if output.shape[0] != x.shape[0] or output.shape[1] != 2 * channels or output.shape[2:] != x.shape[2:]:
            raise ValueError(f"DDPM(loss_type='hybrid') learns the variance: the net must output 2 x {channels} "
                             f"channels, got shape {tuple(output.shape)} for x of shape {tuple(x.shape)}; "
                             f"build it with out_channels={2 * channels}")
        prediction, v = output.chunk(2, dim=1)
        return prediction, v

    def _reverse_gaussian(self, schedule: NoiseSchedule, prediction: Tensor, v: Tensor | None, x_t: Tensor,
                          t: Tensor, clip: bool) -> tuple[Tensor, Tensor]:
        """Mean and log-variance of ``p(x_{t-1} | x_t) = N(mu~_t(x0_hat, x_t), Sigma)``; ``clip`` clamps
        x0_hat to [-1, 1] (images)."""
        x0_hat = schedule.predict_x0(self.parameterization, prediction, x_t, t)
        if clip:
            x0_hat = x0_hat.clamp(-1, 1)
        return schedule.q_posterior_mean(x0_hat, x_t, t), schedule.model_log_variance(self.variance, t, x_t, v)

    def _is_image(self, x: Tensor) -> bool:
        return self.is_image if self.data_shape is not None else x.ndim == 4

    # -- training: the hybrid VLB term and min-SNR on GaussianDiffusionModel.loss ---------------
    def training_times(self, batch: int, generator: torch.Generator | None, device) -> tuple[Tensor, Tensor]:
        """Integer steps uniform in ``{0, ..., T-1}``, each of weight 1."""
        return uniform_steps(batch, self.schedule.timesteps, generator, device), torch.ones(batch, dtype=torch.float64,
                                                                                           device=device)

    def loss_weight(self, t: Tensor, alpha: Tensor | None = None, sigma: Tensor | None = None) -> Tensor:
        """Per-sample weight [B] (float64) of the MSE at integer steps ``t``: min-SNR-gamma
        (:func:`~lightning_diffusion.diffusion.parameterization.min_snr_weight`) with ``min_snr_gamma``, else 1."""
        snr = self.schedule.snr.to(t.device)[t.long()]
        if self.min_snr_gamma is None:
            return torch.ones_like(snr)
        return param.min_snr_weight(snr, self.min_snr_gamma, self.parameterization)

    def extra_loss(self, x0: Tensor, x_t: Tensor, t: Tensor, output: Tensor, extra: Tensor | None) -> Tensor | float:
        """``loss_type="hybrid"``: ``lambda T L_t`` in bits/dim, the bound's term at the drawn steps
        with the mean's gradient stopped, so that it trains only the learned variance ``extra``."""
        if not self.learn_sigma:
            return 0.0
        mean, log_variance = self._reverse_gaussian(self.schedule, output.detach().float(), extra.float(),
                                                    x_t.float(), t, clip=False)
        terms = vlb.vlb_terms(self.schedule, x0.float(), x_t.float(), t, mean, log_variance, self._is_image(x0))
        return self.vlb_weight * self.schedule.timesteps * vlb.nats_to_bits_per_dim(terms, x0[0].numel()).mean()

    # -- sampling ------------------------------------------------------------------------------
    def sample(self, num_samples: int, *, y: Tensor | None = None, generator: torch.Generator | None = None,
               sampler: str = "ancestral", steps: int | None = None, guidance_scale: float = 1.0,
               **options: Any) -> Tensor:
        """Draw samples with a named sampler of :mod:`~lightning_diffusion.diffusion.samplers`
        (default ``ancestral`` over all T steps); images come back in [-1, 1].

        ``steps`` respaces the DDPM grid (evenly spaced integer steps from T-1 to 0); None is the
        sampler's default. ``y`` [num_samples] conditions a class-conditional model (-1:
        unconditional); ``guidance_scale`` w applies classifier-free guidance
        (:meth:`guided_denoiser`). Other ``options`` go to the sampler (``ancestral`` gets
        ``variance`` = the model's fixed ``variance`` unless given; a learned variance is not used
        by the samplers). The number of network evaluations is stored in ``last_sample_nfe``
        (a guided evaluation counts once, though it runs a 2B batch).
        """
        self.check_sample_options(sampler=sampler, steps=steps, guidance_scale=guidance_scale, **options)
        if sampler == "ancestral":
            options.setdefault("variance", self.variance)
        return self.draw_samples(sampler, self.process, num_samples, y=y, guidance_scale=guidance_scale,
                                 steps=steps, generator=generator, **options)

    def check_bpd_options(self, **options: Any) -> None:
        """Raise :class:`~lightning_diffusion.errors.OptionError` unless :meth:`bits_per_dim` takes
        these options: by its signature, and ``steps`` None or 1..T (the respaced bound's steps)."""
        super().check_bpd_options(**options)
        steps = options.get("steps")
        if steps is not None:  # None: the full bound
            timesteps = self.schedule.timesteps
            check_steps(steps, steps, 1, timesteps, f" (the respaced bound of a DDPM of {timesteps} timesteps)")

    # -- likelihood ----------------------------------------------------------------------------
    bpd_estimator_options = {"vlb": ("steps", "batch_t"), "ais": AIS_OPTIONS}

    def bpd_estimator(self, *, steps: int | None = None, estimator: str = "vlb", **_: Any) -> str:
        """Name of what :meth:`bits_per_dim` returns with these options: ``vlb`` (the full bound),
        ``vlb-respaced-S``, or ``ais-energy-t0`` (``estimator="ais"``)."""
        if estimator == "ais":
            return AIS_ESTIMATOR
        return "vlb" if steps is None else f"vlb-respaced-{steps}"

    @full_precision
    def bits_per_dim(self, x: Tensor, *, steps: int | None = None, batch_t: PositiveInt = 100,
                     estimator: str = "vlb", num_dequantizations: PositiveInt = 1,
                     ais_chains: PositiveInt | None = None, ais_steps: PositiveInt | None = None,
                     ais_step_size: Positive | None = None, ais_transition: str | None = None,
                     generator: torch.Generator | None = None, y: Tensor | None = None, **options: Any) -> Tensor:
        """The variational bound ``L_vlb = L_T + sum_{t=1}^{T-1} L_t + L_0`` of each sample, in bits/dim [B].

        Every term is evaluated (improved-diffusion's ``calc_bpd_loop``), each with one draw
        ``x_t ~ q(x_t | x_0)``: the prior KL ``L_T = KL(q(x_T | x_0) || N(0, I))``, the KL of the
        true posterior against the model's reverse Gaussian at every step t >= 1, and the decoder
        ``L_0 = -log p(x_0 | x_1)``. 8-bit images (data_shape [C, H, W], values on the 8-bit grid
        in [-1, 1]) get the discretized Gaussian decoder, so the number bounds the NLL of the
        discrete data and compares with papers (Ho et al. CIFAR-10: <= 3.70); points get the
        Gaussian density, bounding their continuous NLL. ``D`` = elements of one sample. The
        reverse variance is the learned one (``loss_type="hybrid"``) or the fixed ``variance``;
        images clip x0_hat to [-1, 1], as the sampler does. With a fixed variance the bound charges an
        error e of x0_hat at step t ``coef1_t^2 e^2 / (2 var_t)`` nats (``e^2 / (2 beta-tilde_1)`` at
        t = 0, ~1e4 e^2): an eps- or v-predicting net's x0_hat errs by ~sigma_t / alpha_t times its own
        error, an ``x0``-predicting one's by its own, so a short-trained ``x0`` net gets a valid but very
        loose bound (colour digits after 500 steps: 83 bits/dim, 62 of them ``L_0``, where ``eps`` gets
        2.7); :meth:`bound_terms` gives the terms.

        Args:
            x: data [B, ...].
            steps: None for the full bound over T steps. An integer S gives a ~T/S times cheaper
                estimate: the bound of the respaced model on S evenly spaced steps ``t_i`` with
                ``beta'_i = 1 - abar_{t_i} / abar_{t_{i-1}}`` (:meth:`NoiseSchedule.respaced`), the
                net still called at the original ``t_i``. It bounds that S-step model's NLL, not
                this model's, and differs from the full bound in either direction: close with a
                learned variance (what improved DDPM respaces) or ``fixedlarge`` on continuous
                data (toy 2-D: 0.59 vs 0.50 bits/dim at S = 100), far off with ``fixedsmall`` on
                continuous data, whose first respaced step has a much too small variance.
            batch_t: steps evaluated in one forward pass: the net sees ``batch_t * B`` samples at
                once, so memory grows with it (lower it for large images).
            generator: source of the noise; None draws it from a generator seeded with
                ``val_seed``, so repeated calls give the same number.
            y: labels for a class-conditional model (None: the unconditional model).
            estimator: ``vlb`` (the bound above) or, for ``parameterization: energy``, ``ais``: the NLL
                of the t -> 0 energy with AIS's log Z
                (:meth:`~lightning_diffusion.models.gaussian_diffusion.GaussianDiffusionModel.ais_bits_per_dim`:
                errs low), where ``num_dequantizations`` (8-bit images) and the ``ais_*`` options
                apply: ``ais_chains`` chains, ``ais_steps`` distributions, ``ais_step_size`` (data
                units; None: sigma_min / alpha_min), ``ais_transition`` (``mala``/``hmc``); None: 64,
                500, sigma_min / alpha_min, ``mala``.
        """
        self.check_bpd_options(steps=steps, batch_t=batch_t, estimator=estimator, num_dequantizations=num_dequantizations,
                               ais_chains=ais_chains, ais_steps=ais_steps, ais_step_size=ais_step_size,
                               ais_transition=ais_transition, **options)  # an unknown option: OptionError
        if estimator == "ais":
            if y is not None:
                raise ValueError("DDPM.bits_per_dim(estimator='ais') scores the unconditional energy; leave y out")
            return self.ais_bits_per_dim(x, num_dequantizations=num_dequantizations, ais_chains=ais_chains,
                                         ais_steps=ais_steps, ais_step_size=ais_step_size,
                                         ais_transition=ais_transition, generator=generator)
        terms = self.bound_terms(x, steps=steps, batch_t=batch_t, generator=generator, y=y)
        return vlb.nats_to_bits_per_dim(terms.sum(0), x[0].numel()).to(x.dtype)

    @full_precision
    def bound_terms(self, x: Tensor, *, steps: int | None = None, batch_t: PositiveInt = 100,
                    generator: torch.Generator | None = None, y: Tensor | None = None) -> Tensor:
        """The terms of :meth:`bits_per_dim`'s bound (``estimator="vlb"``), each per sample in nats
        [S + 1, B]: row 0 the prior KL ``L_T``, row 1 the decoder ``L_0 = -log p(x_0 | x_1)``, row 1 + i
        the KL of step i >= 1 (S = T, or ``steps`` of the respaced bound). Their sum over rows divided
        by ``D ln 2`` is :meth:`bits_per_dim`; the rows show where a bound is loose (an x0-predicting
        net's error at small t is charged ``coef1_t^2 / (2 var_t)`` per unit squared error, ~1e4 at
        t = 0 with the fixed variances, so ``L_0`` and the first steps dominate). Arguments as
        :meth:`bits_per_dim`'s: data ``x`` [B, ...], ``steps`` (None: all T), ``batch_t`` steps per
        forward pass, the noise ``generator`` (None: seeded with ``val_seed``), labels ``y``.
        """
        if steps is not None:
            self.check_bpd_options(steps=steps)
        schedule = self.schedule if steps is None else self.schedule.respaced(steps)
        images = self._is_image(x)
        if images and (x.min() < -1 - 1e-6 or x.max() > 1 + 1e-6):
            raise ValueError("DDPM.bits_per_dim: images must lie in [-1, 1] (8-bit values k / 127.5 - 1)")
        if generator is None:
            generator = torch.Generator(device=x.device).manual_seed(self.val_seed)
        dtype = torch.float32 if x.device.type == "mps" else torch.float64
        x0, batch = x.to(dtype), x.shape[0]
        y = None if y is None else y.to(x.device)
        original_steps = schedule.original_steps.to(x.device)
        rows = [None] * schedule.timesteps
        with evaluating(self):
            prior = vlb.prior_kl(schedule, x0)
            for start in range(0, schedule.timesteps, batch_t):
                steps_chunk = torch.arange(start, min(start + batch_t, schedule.timesteps), device=x.device)
                n = len(steps_chunk)
                t = steps_chunk.repeat_interleave(batch)  # row j * B + b: step j of the chunk, sample b
                x0_rep = x0.repeat(n, *([1] * (x.ndim - 1)))
                noise = torch.randn(x0_rep.shape, generator=generator, device=generator.device, dtype=x.dtype)
                x_t = schedule.q_sample(x0_rep, t, noise.to(x.device, dtype))
                # the row's F of the net (its output; an energy net's gradient)
                output = param.row(self.parameterization).output(self.net, x_t.to(x.dtype), original_steps[t].to(x.dtype),
                                                                 None if y is None else y.repeat(n))
                prediction, v = self.split_output(output.to(dtype), x_t)
                mean, log_variance = self._reverse_gaussian(schedule, prediction, v, x_t, t, clip=images)
                terms = vlb.vlb_terms(schedule, x0_rep, x_t, t, mean, log_variance, discrete=images)
                rows[start:start + n] = terms.view(n, batch).unbind(0)
        return torch.stack([prior, *rows])
