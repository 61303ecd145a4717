"""ScoreSDE (Song et al. 2021): continuous-time score-based models over VP, sub-VP and VE SDEs."""

from __future__ import annotations

import copy
import math
import typing
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_diffusion.diffusion import likelihood, vlb
from lightning_diffusion.diffusion.parameterization import SDEParameterization, row
from lightning_diffusion.diffusion.schedules import append_dims
from lightning_diffusion.diffusion.sde import VPSDE, GaussianProcess
from lightning_diffusion.errors import OptionError
from lightning_diffusion.models.base import full_precision
from lightning_diffusion.models.gaussian_diffusion import AIS_ESTIMATOR, AIS_OPTIONS, GaussianDiffusionModel
from lightning_diffusion.modes import evaluating
from lightning_diffusion.options import Positive, PositiveInt

Weighting = Literal["sigma2", "likelihood"]


class ScoreSDE(GaussianDiffusionModel):
    """Score-based generative model trained by denoising score matching on a Gaussian SDE.

    Training draws ``t ~ U(t_eps, 1)`` (or from the importance distribution of the likelihood
    weighting), ``x_t = alpha(t) x_0 + sigma(t) eps``, and minimises
    ``lambda(t) || s_theta(x_t, t) - grad log p(x_t | x_0) ||^2`` with ``lambda = sigma^2`` (Song et
    al. 2021, eq. 7) or ``lambda = g^2`` (likelihood weighting, Song et al. 2021b). The net sees the
    continuous time t in (0, 1] and outputs eps (``eps``), the score (``score``), the raw output F
    of EDM preconditioning (``edm``), or an energy whose gradient is eps (``energy``): rows of :mod:`~lightning_diffusion.diffusion.parameterization`,
    which also give the loss its target. With ``x0_hat`` the denoiser, ``sigma^2`` weighting is the
    x0-space weight ``SNR = alpha^2 / sigma^2`` (on the net's output ``SNR c_out^2``: 1 for eps,
    ``sigma^2`` for the score); EDM's row trains with its own weight (1 on F) whatever ``weighting``.
    """

    #: options whose change makes the checkpoint's weights mean something else: a resume refuses them
    resume_fixed_hparams = ("data_shape", "sde", "parameterization", "sigma_data", "class_conditional", "label_attributes")

    def __init__(
        self,
        net: nn.Module,
        sde: GaussianProcess | None = None,
        parameterization: SDEParameterization = "eps",
        weighting: Weighting = "sigma2",
        importance_sampling: bool = False,
        t_eps: float = 1e-5,
        sigma_data: float = 0.5,
        sampler: str = "pc",
        sample_steps: int = 1000,
        likelihood_divergence: likelihood.Divergence = "auto",
        class_conditional: bool = False,
        label_dropout: float = 0.1,
        **kwargs: Any,
    ):
        """
        Args:
            net: ``net(x, t, y=None)`` with continuous t in (0, 1] (give our UNet/MLP ``time_scale: 1000``).
            sde: the forward process: ``VPSDE`` (default, beta 0.1..20), ``SubVPSDE`` or ``VESDE``
                (sigma 0.01..50).
            parameterization: what the net outputs: ``eps`` (score = -eps/sigma), ``score``,
                ``edm`` (EDM preconditioning with ``sigma_data``), or ``energy`` (one number per
                sample E, score = -grad_x E / sigma: the net an :class:`~lightning_diffusion.EnergyHead`).
            weighting: ``sigma2`` (lambda = sigma^2) or ``likelihood`` (lambda = g^2, which makes the
                loss an upper bound on the NLL). Ignored for ``edm``, which uses EDM's weight.
            importance_sampling: with likelihood weighting, draw t with density proportional to
                g^2/sigma^2 and reweight, which reduces the variance of the loss.
            t_eps: smallest training (and sampling/likelihood) time; Song et al. use 1e-5 (1e-3
                with the reverse-diffusion sampler on VP).
            sigma_data: EDM's data standard deviation (0.5 for images in [-1, 1]).
            sampler: default sampler name for ``sample()`` (``pc`` is score_sde's default).
            sample_steps: number of steps of the default ``sampler`` (other samplers use their own
                defaults unless ``steps`` is given; the adaptive ``ode`` takes none).
            likelihood_divergence: the divergence of the ODE likelihood: ``auto`` (exact for data of
                D <= 16 dimensions, ``likelihood.EXACT_DIVERGENCE_MAX_DIMS``, Rademacher above),
                ``exact``, or Hutchinson's estimate with a ``rademacher`` or ``gaussian`` probe.
                Exact costs D vector-Jacobian products per ODE evaluation against Hutchinson's one
                and has none of the noise of Hutchinson's one probe a sample, so exact where that
                noise matters and costs little (the measured costs and errors: README, ScoreSDE
                likelihood; ``benchmarks/bench_divergence.py``).
            class_conditional: feed labels to the net, with ``label_dropout`` for guidance.
            label_dropout: probability of replacing a label by the null label -1 in training.
            **kwargs: data facts and optimizer settings of
                :class:`~lightning_diffusion.models.base.GenerativeModel`.

        The given ``sde`` is not changed: the model keeps a copy whose ``t_min`` is ``t_eps``.
        """
        super().__init__(class_conditional=class_conditional, label_dropout=label_dropout, **kwargs)
        self.save_hyperparameters_except("net", "sde")
        for name, value, choices in (("parameterization", parameterization, typing.get_args(SDEParameterization)),
                                     ("weighting", weighting, ("sigma2", "likelihood")),
                                     ("likelihood_divergence", likelihood_divergence, ("auto", "rademacher", "gaussian", "exact"))):
            if value not in choices:
                raise ValueError(f"ScoreSDE: unknown {name} {value!r}; choose one of {', '.join(map(repr, choices))}")
        self.sde = self._own_sde(sde, t_eps)
        if not isinstance(importance_sampling, bool):
            raise ValueError(f"ScoreSDE: importance_sampling={importance_sampling!r} must be true or false")
        if importance_sampling and weighting != "likelihood":
            raise ValueError(f"ScoreSDE: importance_sampling=True draws t for the likelihood weighting (density "
                             f"g^2/sigma^2) and does nothing with weighting={weighting!r}; set weighting: likelihood, "
                             "or importance_sampling: false")
        if isinstance(sigma_data, bool) or not isinstance(sigma_data, (int, float)) or not sigma_data > 0:
            raise ValueError(f"ScoreSDE: sigma_data={sigma_data!r} must be a number > 0 (EDM: 0.5 for images in [-1, 1])")
        self.net = net
        self.parameterization, self.weighting = parameterization, weighting
        self.importance_sampling, self.t_eps = importance_sampling, t_eps
        self.sigma_data = sigma_data
        self.sampler, self.sample_steps = sampler, sample_steps
        self.likelihood_divergence = likelihood_divergence
        self._check_default_sampler()
        self._is_grid: tuple[Tensor, Tensor] | None = None
        self._last_likelihood_dims: int | None = None  # names the estimator of a model without data_shape

    @property
    def process(self) -> GaussianProcess:
        """The Gaussian process the samplers run over (the layer's name for it): :attr:`sde`."""
        return self.sde

    @staticmethod
    def _own_sde(sde: GaussianProcess | None, t_eps: float) -> GaussianProcess:
        """The model's own process: a copy of ``sde`` (default ``VPSDE()``) integrated down to
        ``t_min = t_eps``; ``t_eps`` is checked to lie in (0, t_max)."""
        if sde is None:
            sde = VPSDE()
        elif not isinstance(sde, GaussianProcess) or getattr(sde, "discrete", False):
            raise ValueError(f"ScoreSDE: sde={sde!r} must be a continuous-time GaussianProcess (VPSDE, SubVPSDE, "
                             "VESDE); a DDPM schedule (DiscreteVP) trains with DDPM")
        t_max = float(sde.t_max)
        if isinstance(t_eps, bool) or not isinstance(t_eps, (int, float)) or not 0 < t_eps < t_max:
            raise ValueError(f"ScoreSDE: t_eps={t_eps!r} must be a number in (0, {t_max:g}), the smallest training "
                             "time (Song et al.: 1e-5, or 1e-3 with the reverse-diffusion sampler on VP)")
        own = copy.copy(sde)
        own.t_min = float(t_eps)
        return own

    # -- time sampling ----------------------------------------------------------------------
    def _importance_grid(self) -> tuple[Tensor, Tensor]:
        """CDF of the density proportional to g^2/sigma^2 on [t_eps, 1], tabulated (float64)."""
        if self._is_grid is None:
            # geometric grid: the density behaves like 1/t near t_eps, where a uniform grid is far off
            t = torch.logspace(math.log10(self.t_eps), math.log10(self.sde.t_max), 20_001, dtype=torch.float64)
            density = self.sde.g2(t) / self.sde.sigma(t) ** 2
            cdf = torch.cat([torch.zeros(1, dtype=torch.float64),
                             torch.cumsum((density[1:] + density[:-1]) / 2 * (t[1:] - t[:-1]), 0)])
            self._is_grid = (t, cdf)
        return self._is_grid

    def training_times(self, batch: int, generator: torch.Generator | None, device) -> tuple[Tensor, Tensor]:
        """:meth:`sample_time`: the training times of :meth:`GaussianDiffusionModel.loss`."""
        return self.sample_time(batch, generator, device)

    def sample_time(self, batch: int, generator: torch.Generator | None, device) -> tuple[Tensor, Tensor]:
        """Training times t [B] and the importance weights that make the loss unbiased [B]."""
        u = torch.rand(batch, generator=generator, device=device, dtype=torch.float64)
        if not (self.importance_sampling and self.weighting == "likelihood"):
            return self.t_eps + u * (self.sde.t_max - self.t_eps), torch.ones(batch, dtype=torch.float64, device=device)
        t_grid, cdf = (a.to(device) for a in self._importance_grid())
        target = u * cdf[-1]
        i = torch.searchsorted(cdf, target).clamp(1, len(cdf) - 1)
        frac = (target - cdf[i - 1]) / (cdf[i] - cdf[i - 1])
        t = t_grid[i - 1] + frac * (t_grid[i] - t_grid[i - 1])
        density = self.sde.g2(t) / self.sde.sigma(t) ** 2 / cdf[-1]
        uniform_density = 1.0 / (self.sde.t_max - self.t_eps)
        return t, uniform_density / density

    # -- the net as denoiser and score --------------------------------------------------------
    def score(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """``grad log p_t(x_t) = (alpha x0_hat - x_t) / sigma^2``."""
        alpha = append_dims(self.sde.alpha(t), x_t.ndim).to(x_t.dtype)
        sigma = append_dims(self.sde.sigma(t), x_t.ndim).to(x_t.dtype)
        return (alpha * self.denoise(x_t, t, y) - x_t) / sigma**2

    # -- training --------------------------------------------------------------------------
    def loss_weight(self, t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """Weight [B] (float64) of the MSE of the net's output: ``sigma^2`` weighting of the score
        error, ``SNR c_out^2`` on the output, times ``g^2 / sigma^2`` with likelihood weighting
        (Song et al. 2021b); 1 for a row with its own weight (EDM)."""
        table_row = row(self.parameterization)
        if table_row.fixed_weight:
            return torch.ones_like(alpha)
        weight = (alpha / sigma) ** 2 * table_row.c_out(alpha, sigma, self.sigma_data) ** 2
        if self.weighting == "likelihood":
            weight = weight * self.sde.g2(t) / self.sde.sigma(t) ** 2
        return weight

    # -- the model contract -------------------------------------------------------------------
    def sample(self, num_samples: int, *, y: Tensor | None = None, generator: torch.Generator | None = None,
               sampler: str | None = None, steps: int | None = None, guidance_scale: float = 1.0,
               **options: Any) -> Tensor:
        """Samples with a named sampler (``pc``, ``euler_maruyama``, ``ode``, ``heun``, ``ddim``,
        ``dpm_solver``, ``ancestral``); images come back in [-1, 1]. The NFE of the last call is in
        ``self.last_sample_nfe``. ``guidance_scale`` > 1 applies classifier-free guidance with ``y``."""
        self.check_sample_options(sampler=sampler, steps=steps, guidance_scale=guidance_scale, **options)
        name, steps = self._sampler_steps(sampler, steps)
        return self.draw_samples(name, self.sde, num_samples, y=y, guidance_scale=guidance_scale, steps=steps,
                                 generator=generator, **options)

    def _check_default_sampler(self) -> None:
        """``sampler`` and ``sample_steps`` of the model itself, checked when it is built."""
        from lightning_diffusion.diffusion.samplers import check_options

        try:
            name, steps = self._sampler_steps(None, None)
            check_options(name, self.sde, steps, energy=self.sampling_energy() is not None)
        except OptionError as error:
            option = "sample_steps" if error.option == "steps" else error.option
            raise ValueError(f"ScoreSDE: {option}={error.value!r}: {error.problem}"
                             + (f"; {error.advice}" if error.advice else "")) from None

    bpd_estimator_options = {"ode": ("divergence", "rtol", "atol", "steps", "num_dequantizations"), "ais": AIS_OPTIONS}

    def bpd_estimator(self, *, divergence: str | None = None, estimator: str = "ode", **_: Any) -> str:
        """Name of what :meth:`bits_per_dim` returns with these options: the probability-flow ODE
        likelihood with the divergence it uses, ``ode-exact``, ``ode-hutchinson-rademacher`` or
        ``ode-hutchinson-gaussian``; ``auto`` is resolved on D = prod(``data_shape``) (or, without
        a data_shape, the D of the last ``bits_per_dim`` call; ``ode`` when neither is known); with
        ``estimator="ais"``, ``ais-energy-t0``."""
        if estimator == "ais":
            return AIS_ESTIMATOR
        divergence = divergence or self.likelihood_divergence
        num_dims = math.prod(self.data_shape) if self.data_shape is not None else self._last_likelihood_dims
        if divergence == "auto" and num_dims is None:
            return "ode"
        divergence = likelihood.resolve_divergence(divergence, num_dims or 0)
        return "ode-exact" if divergence == "exact" else f"ode-hutchinson-{divergence}"

    @full_precision
    def bits_per_dim(self, x: Tensor, *, num_dequantizations: PositiveInt = 1,
                     divergence: likelihood.Divergence | None = None, rtol: Positive = 1e-5, atol: Positive = 1e-5,
                     steps: PositiveInt | None = None, estimator: str = "ode",
                     ais_chains: PositiveInt | None = None, ais_steps: PositiveInt | None = None,
                     ais_step_size: Positive | None = None, ais_transition: str | None = None,
                     generator: torch.Generator | None = None, **options: Any) -> Tensor:
        """Negative log-likelihood [B] in bits/dim through the probability-flow ODE.

        8-bit images are uniformly dequantized (``num_dequantizations`` draws, averaged) and scored
        as discrete data (+7 bits/dim offset, score_sde's convention); points get their continuous
        NLL. ``steps`` switches to a fixed rk4 grid: the same number of net evaluations on every
        rank, as a sharded model needs. ``divergence`` (default: the model's
        ``likelihood_divergence``, ``auto``) is exact for D = ``x[0].numel()`` <= 16 and Hutchinson
        (Rademacher) above; :meth:`bpd_estimator` names the one used. The NFE of the last call is in
        ``self.last_likelihood_nfe``, the divergence used in ``self.last_likelihood_divergence``.

        ``estimator="ais"`` (``parameterization: energy``) scores the t -> 0 energy with AIS's log Z
        instead (:meth:`~lightning_diffusion.models.gaussian_diffusion.GaussianDiffusionModel.ais_bits_per_dim`:
        errs low), with ``num_dequantizations`` and the ``ais_*`` options (``ais_chains`` chains,
        ``ais_steps`` distributions, ``ais_step_size`` in data units, ``ais_transition`` ``mala`` or
        ``hmc``; None: 64, 500, sigma_min / alpha_min, ``mala``); the ODE's options are then refused.
        """
        self.check_bpd_options(num_dequantizations=num_dequantizations, divergence=divergence, rtol=rtol, atol=atol,
                               steps=steps, estimator=estimator, ais_chains=ais_chains, ais_steps=ais_steps,
                               ais_step_size=ais_step_size, ais_transition=ais_transition, **options)
        if estimator == "ais":
            return self.ais_bits_per_dim(x, num_dequantizations=num_dequantizations, ais_chains=ais_chains,
                                         ais_steps=ais_steps, ais_step_size=ais_step_size,
                                         ais_transition=ais_transition, generator=generator)
        if steps is None:
            self.require_fixed_steps("bits_per_dim(steps=None)", "steps=N (a fixed rk4 grid; Likelihood's "
                                     "bpd_options: {steps: N})")
        num_dims = x[0].numel()
        divergence = likelihood.resolve_divergence(divergence or self.likelihood_divergence, num_dims)
        with evaluating(self):
            results = []
            for _ in range(num_dequantizations if self.is_image else 1):
                data = likelihood.dequantize(x, generator) if self.is_image else x
                nll, nfe = likelihood.ode_nll(lambda xt, t: self.score(xt, t), self.sde, data, divergence=divergence,
                                              rtol=rtol, atol=atol, steps=steps, generator=generator)
                bpd = (likelihood.bits_per_dim_discrete(nll, num_dims) if self.is_image
                       else vlb.nats_to_bits_per_dim(nll, num_dims))
                results.append(bpd)
        self.last_likelihood_nfe, self.last_likelihood_divergence = nfe, divergence
        self._last_likelihood_dims = num_dims
        return torch.stack(results).mean(0)

