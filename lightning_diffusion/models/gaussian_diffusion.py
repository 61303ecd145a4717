"""The Gaussian-diffusion layer of DDPM and ScoreSDE: the denoiser ``x0_hat(x_t, t)`` and the
denoising loss of a net in any parameterization of
:mod:`~lightning_diffusion.diffusion.parameterization` over a
:class:`~lightning_diffusion.diffusion.sde.GaussianProcess`, classifier-free guidance, the sampler
driver and the denoising trajectory.

A family of this layer sets ``net``, ``parameterization`` and ``process``, says how it draws its
training times (:meth:`GaussianDiffusionModel.training_times`) and weights them
(:meth:`GaussianDiffusionModel.loss_weight`), and calls :meth:`draw_samples` with its process from
``sample``; every sampler of :mod:`~lightning_diffusion.diffusion.samplers` then serves it
(DEVELOPERS.md, "The diffusion math in one form").
"""

from __future__ import annotations

import contextlib
import math
import typing
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from lightning_diffusion.diffusion import parameterization as param
from lightning_diffusion.diffusion import samplers
from lightning_diffusion.diffusion.schedules import append_dims
from lightning_diffusion.errors import OptionError
from lightning_diffusion.mcmc.ais import Transition
from lightning_diffusion.models.base import SAMPLE_ARGUMENTS, GenerativeModel, data_noise
from lightning_diffusion.models.guidance import guided
from lightning_diffusion.modes import evaluating
from lightning_diffusion.options import check_call, defaults_of, options_of

#: the arithmetic of the net while sampling (``sample(..., precision=...)``)
SAMPLE_PRECISIONS = ("32", "bf16")

#: options of ``sample`` that the sampler driver (:meth:`GaussianDiffusionModel.draw_samples`) takes
#: itself; the rest go to the sampler
DRIVER_OPTIONS = ("clip", "precision", "callback")

#: what ``bpd_estimator`` names ``bits_per_dim(estimator="ais")``: AIS on the t -> 0 energy
AIS_ESTIMATOR = "ais-energy-t0"
#: the options of ``bits_per_dim(estimator="ais")`` and the values their None stands for (64 chains
#: through 500 distributions, one MALA move of step None = sigma_min / alpha_min at each)
AIS_DEFAULTS: dict[str, Any] = {"ais_chains": 64, "ais_steps": 500, "ais_step_size": None, "ais_transition": "mala"}
AIS_OPTIONS = (*AIS_DEFAULTS, "num_dequantizations")

#: the net a diffusion family uses for each kind of data: (name, class_path)
DIFFUSION_NETS = {"images": ("UNet", "UNet"), "points": ("MLP", "lightning_diffusion.MLP")}

#: the callbacks' fast sampler (:meth:`GaussianDiffusionModel.preview_sample_options`): DPM-Solver++(2M)
#: (Lu et al. 2022, Algorithm 2) at 20 steps, chosen by the README's sampler benchmark ("Samplers:
#: quality versus NFE") against 1000-step ancestral sampling
PREVIEW_SAMPLER, PREVIEW_STEPS = "dpm_solver", 20
#: the log-SNR step of that benchmarked grid (VP SDE from t = 1 to 1e-5: 11.9 / 20); a process whose
#: log-SNR spans more gets more steps, up to PREVIEW_MAX_STEPS (sub-VP at t_eps 1e-5: 18.8, 32 steps)
PREVIEW_LOGSNR_STEP, PREVIEW_MAX_STEPS = 0.6, 50


class GaussianDiffusionModel(GenerativeModel):
    """Base of :class:`~lightning_diffusion.models.ddpm.DDPM` and
    :class:`~lightning_diffusion.models.score_sde.ScoreSDE`.

    Holds ``class_conditional`` and ``label_dropout`` (the labels of the batch go to the net,
    each replaced by the null label -1 with probability ``label_dropout`` in training, for
    classifier-free guidance), and ``last_sample_nfe``, the network evaluations of the last
    :meth:`draw_samples`. Has the optional contract ``sample_trajectory``
    (:class:`~lightning_diffusion.callbacks.protocol.HasTrajectory`).
    """

    data_nets = DIFFUSION_NETS

    def __init__(self, class_conditional: bool = False, label_dropout: float = 0.1,
                 label_attributes: list[int] | None = None, **kwargs: Any):
        """
        Args:
            class_conditional: feed the labels ``y`` of the batch to the net.
            label_dropout: with ``class_conditional``, the probability of replacing a label by the
                null label -1 in training (classifier-free guidance, Ho & Salimans 2022); with
                ``label_attributes``, of dropping each attribute, independently.
            label_attributes: per-attribute conditioning: the class count of each attribute, whose
                product is ``num_classes`` (``colour_digits``: ``[10, 8]``, digit and colour). The joint
                label ``y`` is read in mixed radix, the first attribute most significant
                (``digit * 8 + colour`` -> ``[digit, colour]``), the net gets ``[B, k]`` labels (its
                ``num_classes`` the same list) and each column is dropped (-1) on its own, so the model
                also learns each attribute alone (composition:
                :func:`~lightning_diffusion.conditional_product`). ``sample(y=...)`` takes ``[B, k]`` or
                joint labels. None: one label.
            **kwargs: data facts and optimizer settings of :class:`GenerativeModel`.
        """
        super().__init__(**kwargs)
        self.set_conditioning(class_conditional, label_dropout, label_attributes)
        self.last_sample_nfe: int | None = None
        #: the Metropolis acceptance rate of each noise level of the last ``draw_samples`` with a sampler
        #: that runs MCMC on the energy (``annealed_mcmc``: one rate per level after the first; 1.0 for
        #: unadjusted moves); None after any other sampler
        self.last_sample_acceptance: list[float] | None = None
        #: the step of each noise level of the last such draw, in units of sigma_t^2 (``step_scale``, as
        #: adapted to the target acceptance; the kernels' step is sqrt(2 step_scale) sigma_t); None otherwise
        self.last_sample_step_scale: list[float] | None = None
        #: what the last ``bits_per_dim(estimator="ais")`` found: log Z_0 and its standard error (nats),
        #: ``stderr_bpd`` (the bits/dim it adds), the ESS, MALA's acceptance and the NFE; None before
        self.last_ais: dict[str, float] | None = None

    #: the family's :class:`~lightning_diffusion.diffusion.sde.GaussianProcess` (DDPM: its
    #: ``DiscreteVP``; ScoreSDE: its ``sde``)
    process: Any
    #: the family's net ``net(x, t, y)`` and the name of what it predicts (a row of
    #: :data:`~lightning_diffusion.diffusion.parameterization.TABLE`)
    net: torch.nn.Module
    parameterization: str
    #: EDM's data standard deviation, read by the ``edm`` row (ScoreSDE's ``sigma_data``)
    sigma_data: float = 0.5

    # -- the net in its parameterization ------------------------------------------------------
    def split_output(self, output: Tensor, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(F, extra): the net's prediction F in its parameterization and what else it outputs (DDPM's
        learned variance); here the output itself and None."""
        return output, None

    def _coefficients(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor, param.Scalings]:
        """alpha(t), sigma(t) and the parameterization's scalings, float64 shaped [B, 1, ...] like ``like``."""
        alpha = append_dims(self.process.alpha(t), like.ndim).to(like.device)
        sigma = append_dims(self.process.sigma(t), like.ndim).to(like.device)
        return alpha, sigma, param.row(self.parameterization).scalings(alpha, sigma, self.sigma_data)

    def _net_time(self, t: Tensor, x_t: Tensor) -> Tensor:
        """The net's time ``c_noise(t)`` in x_t's dtype (an integer DDPM step as float32)."""
        t_net = param.row(self.parameterization).c_noise(t)
        return t_net.to(x_t.dtype) if t_net.is_floating_point() else t_net.float()

    def _run_net(self, net: Callable[..., Tensor], scalings: param.Scalings, x_t: Tensor, t: Tensor,
                 y: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """:meth:`split_output` of F, the row's ``output`` of ``net(c_in x_t, c_noise(t), y)`` (the
        net's output, or for ``energy`` the gradient of its scalar)."""
        with self._gathered_through_the_energy_gradient():
            output = param.row(self.parameterization).output(net, scalings.c_in.to(x_t.dtype) * x_t,
                                                             self._net_time(t, x_t), y)
        return self.split_output(output, x_t)

    @contextlib.contextmanager
    def _gathered_through_the_energy_gradient(self) -> Iterator[None]:
        """Under FSDP2, while an energy net's training step takes ``grad_x E`` with a graph: keep the
        gathered parameters after that first backward, which the loss's backward goes through again.

        FSDP2 reshards (frees the gathered parameters) at the end of every backward, the inner
        ``autograd.grad`` too, and the loss's backward then fails on freed storage (torch 2.14:
        "RuntimeError: The tensor has a non-zero number of elements, but its data is not allocated
        yet"). Its own switch ``set_reshard_after_backward(False)`` skips that reshard for the inner
        backward only; set back at once, the loss's backward reshards as usual and reduce-scatters
        the gradients. Only in training with gradients on, where that second backward follows:
        sampling and evaluation (no graph) reshard after their one backward."""
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in self.modules() if isinstance(m, FSDPModule)] \
            if self.training and torch.is_grad_enabled() and param.row(self.parameterization).energy_scale is not None \
            else []
        for unit in units:
            unit.set_reshard_after_backward(False, recurse=False)
        try:
            yield
        finally:
            for unit in units:
                unit.set_reshard_after_backward(True, recurse=False)

    def energy(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """The model's energy ``E(x_t, t) [B]`` in nats: ``-log p_t(x_t)`` up to a constant of t, with
        ``score = -grad_x E``, at the process's time t [B] (or a scalar); float32 (or x_t's dtype if
        wider), differentiable where gradients are on (an MCMC kernel's target ``exp(-E)``).

        Only a parameterization whose net outputs an energy has one (``energy``: the net's scalar
        ``E_net`` in sigma-nats times ``energy_scale = 1 / sigma``,
        :mod:`~lightning_diffusion.diffusion.parameterization`); ValueError otherwise."""
        table_row = param.row(self.parameterization)
        if table_row.energy_scale is None:
            raise ValueError(f"{type(self).__name__}.energy: parameterization {self.parameterization!r} has no energy "
                             "(its net outputs a vector, not -log p_t); train with parameterization: energy and an "
                             "energy net (lightning_diffusion.EnergyHead)")
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        alpha, sigma, c = self._coefficients(t, x_t)
        y = self.condition_labels(y, check=False)
        energy = param.check_energy(self.net(c.c_in.to(x_t.dtype) * x_t, self._net_time(t, x_t), y), x_t)
        scale = table_row.energy_scale(alpha.flatten(), sigma.flatten(), self.sigma_data)
        dtype = torch.promote_types(x_t.dtype, torch.float32)
        return energy.to(dtype) * scale.to(dtype)

    def denoise(self, x_t: Tensor, t: Tensor, y: Tensor | None = None,
                net: Callable[..., Tensor] | None = None) -> Tensor:
        """``x0_hat(x_t, t) = c_skip x_t + c_out F(c_in x_t, c_noise(t), y)``: the clean-data estimate
        at the process's time t [B] (or a scalar), in float32 (or x_t's dtype if wider). ``net``:
        the net to evaluate (default ``self.net``; :meth:`draw_samples` passes a bfloat16 copy)."""
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        _, _, c = self._coefficients(t, x_t)
        output, _ = self._run_net(self.net if net is None else net, c, x_t, t, self.condition_labels(y, check=False))
        dtype = torch.promote_types(x_t.dtype, torch.float32)
        return c.c_skip.to(dtype) * x_t.to(dtype) + c.c_out.to(dtype) * output.to(dtype)

    # -- the denoising loss --------------------------------------------------------------------
    def training_times(self, batch: int, generator: torch.Generator | None, device) -> tuple[Tensor, Tensor]:
        """Training times t [B] of the process and their importance weights [B] (float64)."""
        raise NotImplementedError

    def loss_weight(self, t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """The weight [B] (float64) of the MSE of F at times t (alpha, sigma: [B]); 1 here, the plain
        MSE of the net's output."""
        return torch.ones_like(alpha)

    def extra_loss(self, x0: Tensor, x_t: Tensor, t: Tensor, output: Tensor, extra: Tensor | None) -> Tensor | float:
        """A term the family adds to the denoising loss (DDPM's hybrid VLB); 0 here."""
        return 0.0

    def loss(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> Tensor:
        """The denoising loss of every Gaussian family (EDM's ``training/loss.py`` in one form): draw t
        and its weight (:meth:`training_times`), ``x_t = alpha x0 + sigma eps``, and regress the net's
        output F on its parameterization's target ``F* = a x0 + b eps``, per sample
        ``w(t) mean((F - F*)^2)`` with ``w`` = importance weight x :meth:`loss_weight`, averaged over
        the batch; plus :meth:`extra_loss`. The draws, in order: t, eps, label dropout."""
        x0 = batch["x"]
        t, weight = self.training_times(x0.shape[0], generator, x0.device)
        noise = data_noise(x0.shape, generator, x0)
        alpha, sigma, c = self._coefficients(t, x0)
        x_t = alpha.to(x0.dtype) * x0 + sigma.to(x0.dtype) * noise
        output, extra = self._run_net(self.net, c, x_t, t, self.training_labels(batch, generator))
        a, b = param.row(self.parameterization).target_coefficients(alpha, sigma, self.sigma_data)
        target = a.to(x0.dtype) * x0 + b.to(x0.dtype) * noise
        mse = (output.float() - target.float()).pow(2).flatten(1).mean(1)
        weight = weight * self.loss_weight(t, alpha.flatten(), sigma.flatten())
        return (mse * weight.to(mse.dtype)).mean() + self.extra_loss(x0, x_t, t, output, extra)

    def guided_denoiser(self, y: Tensor | None = None, guidance_scale: float = 1.0,
                        net: Callable[..., Tensor] | None = None) -> Callable[[Tensor, Tensor], Tensor]:
        """``denoise_fn(x_t, t) -> x0_hat`` for the samplers, evaluating ``net`` (default ``self.net``).

        With ``guidance_scale = w != 1`` (classifier-free guidance, Ho & Salimans 2022):
        ``x0_hat = x0_hat(x_t | null) + w (x0_hat(x_t | y) - x0_hat(x_t | null))``, both from one
        forward pass of the 2B batch ``(y, -1)``. ``w = 1`` is the conditional model, ``w = 0`` the
        unconditional one.
        """
        self._check_guidance(y, guidance_scale)
        return guided(lambda x_t, t, labels: self.denoise(x_t, t, labels, net), y, guidance_scale)

    def _check_guidance(self, y: Tensor | None, guidance_scale: float) -> None:
        if guidance_scale != 1.0 and (not self.class_conditional or y is None):
            raise ValueError(f"{type(self).__name__}.sample: guidance_scale={guidance_scale} needs a class_conditional model "
                             "and labels y; use guidance_scale=1.0 otherwise")

    def preview_sample_options(self) -> dict[str, Any]:
        """The callbacks' fast default: ``{sampler: dpm_solver, steps: S}``, S = 20 network calls on a
        VP SDE, a VE SDE or a DDPM's linear schedule. S keeps the log-SNR step of the benchmarked
        20-step grid (:data:`PREVIEW_LOGSNR_STEP`), so a process whose log-SNR spans more gets more,
        at most 50: sub-VP at ``t_eps`` 1e-5 32 (README: preview sampler), a cosine DDPM 25. A DDPM of at most
        20 timesteps gets ``{}``: its own default, ancestral over all T steps, takes no more
        network calls and is the model's exact reverse process."""
        process = self.process
        if process.discrete and int(process.t_max) + 1 <= PREVIEW_STEPS:
            return {}
        ratio = process.ratio(torch.tensor([float(process.t_max), float(process.t_min)], dtype=torch.float64))
        span = float(ratio[0].log() - ratio[1].log())  # the log-SNR range the sampler crosses
        steps = min(PREVIEW_MAX_STEPS, max(PREVIEW_STEPS, math.ceil(span / PREVIEW_LOGSNR_STEP - 1e-9)))
        return {"sampler": PREVIEW_SAMPLER, "steps": steps}

    def sampling_energy(self, y: Tensor | None = None, guidance_scale: float = 1.0) -> samplers.EnergyFn | None:
        """``energy_fn(x_t, t) -> E [B]`` for the samplers that run MCMC on the model's energy
        (``needs_energy``: ``annealed_mcmc``): ``self.energy(x_t, t, y)`` where the
        parameterization's row has an energy (``energy``), None otherwise, which those samplers refuse.

        With ``guidance_scale = w != 1``, classifier-free guidance of the energy, itself an energy:
        ``E(x_t | null) + w (E(x_t | y) - E(x_t | null))`` (the composition of the terms ``(y, w)`` and
        ``(null, 1 - w)``, :func:`~lightning_diffusion.models.compose.compose`), whose gradient is the
        guided score of :meth:`guided_denoiser`; both energies from one call on the 2B batch ``(y, -1)``."""
        if param.row(self.parameterization).energy_scale is None:  # the table says whether the net is an energy
            return None
        self._check_guidance(y, guidance_scale)
        return guided(lambda x_t, t, labels: self.energy(x_t, t, labels), y, guidance_scale)

    # -- the second likelihood estimator of an energy model: AIS on the t -> 0 energy ----------
    #: ``{estimator: its own options of bits_per_dim}``: given at a value other than its default with
    #: another estimator, an option is refused (:meth:`check_bpd_options`), never silently unused.
    #: A family lists its default estimator's options; ``ais`` is :meth:`ais_bits_per_dim`'s
    bpd_estimator_options: dict[str, tuple[str, ...]] = {"ais": AIS_OPTIONS}

    def check_bpd_options(self, **options: Any) -> None:
        """Also refuse ``estimator="ais"`` for a model without an energy, and an option of one
        estimator (:attr:`bpd_estimator_options`) given with another."""
        super().check_bpd_options(**options)
        estimator = options.get("estimator") or defaults_of(self.bits_per_dim).get("estimator")
        if estimator == "ais" and param.row(self.parameterization).energy_scale is None:
            raise OptionError("estimator", "ais", f"AIS on the t -> 0 energy needs an energy; {type(self).__name__}"
                              f"(parameterization={self.parameterization!r}) has none",
                              "train with parameterization: energy (an EnergyHead net), or leave estimator out")
        # estimator and ais_transition are plain str, not Literal: which choices a model takes depends on it
        # ("ais" needs an energy) and on the estimator (ais_transition is AIS's alone)
        if estimator not in self.bpd_estimator_options:
            raise OptionError("estimator", estimator, "unknown estimator",
                              f"choose one of {', '.join(map(repr, self.bpd_estimator_options))}")
        transitions = typing.get_args(Transition)
        if options.get("ais_transition") is not None and options["ais_transition"] not in transitions:
            raise OptionError("ais_transition", options["ais_transition"], "unknown AIS transition",
                              f"choose one of {', '.join(map(repr, transitions))}")
        defaults, own = defaults_of(self.bits_per_dim), self.bpd_estimator_options.get(estimator, ())
        for other, names in self.bpd_estimator_options.items():
            for name in names:
                if other != estimator and name not in own and name in options \
                        and options[name] is not None and options[name] != defaults.get(name):
                    raise OptionError(name, options[name], f"is an option of estimator={other!r}, not of "
                                      f"estimator={estimator!r}", f"leave it out, or give estimator: {other}")

    @property
    def ais_time(self) -> Tensor:
        """t_min of the process, the time of the energy AIS integrates (a DDPM's step 0, a ScoreSDE's
        ``t_eps``), as a 0-d tensor of the process's time type."""
        return torch.tensor(int(self.process.t_min)) if self.process.discrete else \
            torch.tensor(float(self.process.t_min), dtype=torch.float64)

    def ais_energy(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """``E_0(x) = E(alpha_min x, t_min) - D log alpha_min`` [B] in nats, up to a constant: the
        model's energy of clean data x, where ``x_{t_min} / alpha_min`` (the data under the smallest
        noise the model knows, std ``sigma_min / alpha_min``: 0.01 for a linear DDPM, 1e-3 on the VP
        SDE) has density ``alpha^D p_{t_min}(alpha x)``. Differentiable in x."""
        t = self.ais_time.to(x.device)
        alpha = self.process.alpha(t.reshape(1)).to(x.device)
        return self.energy(alpha.to(x.dtype) * x, t.expand(x.shape[0]), y) \
            - x[0].numel() * torch.log(alpha).to(torch.promote_types(x.dtype, torch.float32))

    def ais_log_partition(self, base_data: Tensor, *, chains: int, steps: int, step_size: float | None,
                          transition: str, generator: torch.Generator | None):
        """Forward AIS (:func:`lightning_diffusion.mcmc.ais`) of ``log Z_0 = log ∫ exp(-E_0(x)) dx``
        (:meth:`ais_energy`, nats) from the diagonal Gaussian fitted to ``base_data`` [N >= 2, ...]
        (:func:`~lightning_diffusion.mcmc.gaussian_base`): ``chains`` chains through ``steps``
        sigmoid-spaced distributions, one ``transition`` move (``mala`` or ``hmc``) of ``step_size``
        (None: ``sigma_min / alpha_min``, the std of the t_min blur) at each. Returns the
        :class:`~lightning_diffusion.mcmc.AISResult`: ``log_z`` is a stochastic *lower* bound of log
        Z_0 (so an NLL from it errs low, optimistic) and ``stderr`` its Monte Carlo standard error
        (not the bias). A class-conditional model is scored unconditionally (the null label)."""
        from lightning_diffusion import mcmc

        if base_data.shape[0] < 2:
            raise ValueError(f"{type(self).__name__}.bits_per_dim(estimator='ais') fits its Gaussian base to the "
                             f"batch: give at least 2 samples, got {base_data.shape[0]}")
        if step_size is None:
            t = self.ais_time.reshape(1)
            step_size = float(self.process.sigma(t) / self.process.alpha(t))
        base = mcmc.gaussian_base(base_data.float())
        return mcmc.ais(self.ais_energy, base, chains, step_size=step_size, betas=steps,
                        transition=transition, generator=generator)

    def ais_bits_per_dim(self, x: Tensor, *, num_dequantizations: int = 1, ais_chains: int | None = None,
                         ais_steps: int | None = None, ais_step_size: float | None = None,
                         ais_transition: str | None = None, generator: torch.Generator | None = None) -> Tensor:
        """``bits_per_dim(estimator="ais")``: ``(E_0(x) + log Z_0) / (D ln 2)`` [B] with log Z_0 from
        one AIS run (:meth:`ais_log_partition`; None options take :data:`AIS_DEFAULTS`), kept with the
        bits/dim it adds in ``last_ais`` (``log_z``, ``stderr`` in nats; ``stderr_bpd``). 8-bit images
        are uniformly dequantized (``num_dequantizations`` draws, averaged) and scored as discrete data
        (+7 bits/dim), as the EBM family does; points get their continuous NLL. AIS's log Z is a
        stochastic lower bound, so the NLL errs *low* by AIS's bias plus a Monte Carlo error of about
        ``stderr_bpd``; run more ``ais_steps`` until it stops rising."""
        from lightning_diffusion import likelihoods

        given = {"ais_chains": ais_chains, "ais_steps": ais_steps, "ais_step_size": ais_step_size,
                 "ais_transition": ais_transition}
        chosen = {k: AIS_DEFAULTS[k] if v is None else v for k, v in given.items()}
        if generator is None:
            generator = torch.Generator(device=x.device).manual_seed(self.val_seed)
        num_dims = x[0].numel()
        with evaluating(self):
            draws = [likelihoods.dequantize(x, generator) if self.is_image else x
                     for _ in range(num_dequantizations if self.is_image else 1)]
            result = self.ais_log_partition(draws[0], chains=chosen["ais_chains"], steps=chosen["ais_steps"],
                                            step_size=chosen["ais_step_size"], transition=chosen["ais_transition"],
                                            generator=generator)
            with torch.no_grad():
                nll = torch.stack([self.ais_energy(data).double() for data in draws]).mean(0) + result.log_z
        self.last_ais = {"log_z": result.log_z, "stderr": result.stderr, "ess": result.ess,
                         "acceptance": result.acceptance, "nfe": result.nfe,
                         "stderr_bpd": result.stderr / (num_dims * math.log(2))}
        bpd = likelihoods.bits_per_dim_discrete(nll, num_dims) if self.is_image else \
            likelihoods.nats_to_bits_per_dim(nll, num_dims)
        return bpd.to(x.dtype)

    # -- checking the options of sample() -------------------------------------------------------
    #: the default sampler of ``sample`` and its step count (None: the sampler's own default);
    #: ScoreSDE sets both from its options
    sampler: str = "ancestral"
    sample_steps: int | None = None

    def _sampler_steps(self, sampler: str | None, steps: int | None) -> tuple[str, int | None]:
        """The sampler's name and step count: None means the model's ``sampler``, whose steps
        default to ``sample_steps`` (other samplers keep their own defaults)."""
        name = sampler or self.sampler
        if steps is None and name == self.sampler and name != "ode":  # sample_steps belongs to the default sampler
            steps = self.sample_steps
        return name, steps

    def check_sample_options(self, **options: Any) -> None:
        """Raise :class:`~lightning_diffusion.errors.OptionError` unless :meth:`sample` takes these
        options: its own by its signature (``sampler``, ``steps``, ``guidance_scale``), guidance only
        on a class-conditional model, the driver's ``clip`` and ``precision``, and the rest by the
        chosen sampler's signature with a step count its grid allows on this model's process
        (:func:`~lightning_diffusion.diffusion.samplers.check_options`)."""
        rest = check_call(self.sample, options, f"{type(self).__name__}.sample", skip=SAMPLE_ARGUMENTS, rest=True)
        self.check_option_rules(options)
        if "precision" in rest:
            check_precision(rest["precision"])
        name, steps = self._sampler_steps(options.get("sampler"), options.get("steps"))
        own = [option for option in options_of(self.sample, SAMPLE_ARGUMENTS) if option != "steps"]
        # callback is a programmatic option (a callable, never in a config): taken, not listed
        samplers.check_options(name, self.process, steps, also=(*own, *(o for o in DRIVER_OPTIONS if o != "callback")),
                               energy=self.sampling_energy() is not None,
                               **{k: v for k, v in rest.items() if k not in DRIVER_OPTIONS})

    # -- the sampler driver -------------------------------------------------------------------------
    def draw_samples(self, sampler: str, process, num_samples: int, *, y: Tensor | None = None,
                     guidance_scale: float = 1.0, steps: int | None = None,
                     generator: torch.Generator | None = None, precision: str = "32", **options: Any) -> Tensor:
        """Run sampler ``sampler`` of :mod:`~lightning_diffusion.diffusion.samplers` on this model's
        (guided) denoiser over ``process``, in eval mode; images are clipped to [-1, 1].

        ``precision`` is the arithmetic of the network evaluations: ``"32"`` (default) float32;
        ``"bf16"`` each evaluation by a bfloat16 copy of the net made for the call (its float inputs
        cast to bf16; under ``torch.autocast(bfloat16)`` where no copy can be made, as on a sharded
        model), its output cast back to float32 (the speed-up: README, ``benchmarks/bench_speed_limit.py``).
        The solver's own arithmetic (the update of ``x_t``, the grid) stays float32 either way, so only
        the denoiser's rounding changes.

        ``callback`` (among ``options``) is the sampler's: called at every network evaluation with
        ``{'x', 'i', 't', 'sigma', 'denoised'}`` (:class:`~lightning_diffusion.diffusion.samplers.CountedDenoiser`).
        The number of network evaluations is stored in ``last_sample_nfe`` (a guided evaluation
        counts once, though it runs a 2B batch). A sampler that runs MCMC on the energy
        (``annealed_mcmc``) gets :meth:`sampling_energy` and counts energy-and-gradient evaluations;
        its acceptance rate per noise level goes to ``last_sample_acceptance`` and its (adapted) step per
        level to ``last_sample_step_scale``; with ``guidance_scale``
        it runs on the guided energy (:meth:`sampling_energy`).
        """
        if sampler == "ode":
            self.require_fixed_steps("sample(sampler='ode')", "a fixed-step sampler (ddim, heun, dpm_solver, ...)")
        shape = (num_samples, *self.require_data_shape())
        y = None if y is None else self.condition_labels(y.to(self.device))  # joint -> [B, k] with label_attributes
        clip = options.pop("clip", (-1.0, 1.0) if self.is_image else None)
        bf16_net = None
        if precision == "bf16":
            bf16_net = self._bf16_copy_of_net()
            exact = self.guided_denoiser(y, guidance_scale, bf16_net)

            def denoise_fn(x_t: Tensor, t: Tensor) -> Tensor:
                with torch.autocast(x_t.device.type, dtype=torch.bfloat16, enabled=bf16_net is None):
                    x0 = exact(x_t, t)
                return x0.float()
        else:
            check_precision(precision)
            denoise_fn = self.guided_denoiser(y, guidance_scale)
        energy_fn = self.sampling_energy(y, guidance_scale) if samplers.registered(sampler).needs_energy else None
        out, acceptance, step_scale = run_sampler(sampler, denoise_fn, energy_fn, process, shape, [self], steps=steps,
                                                  generator=generator, device=self.device, clip=clip, **options)
        self.last_sample_nfe, self.last_sample_acceptance, self.last_sample_step_scale = out.nfe, acceptance, step_scale
        return out.x.clamp(-1, 1) if self.is_image else out.x

    def _bf16_copy_of_net(self) -> torch.nn.Module | None:
        """A bfloat16 copy of the net (current weights) whose float inputs are cast to bf16, for one
        ``sample(precision="bf16")`` call: its convolutions then skip autocast's per-call weight casts
        (faster than autocast: README, ``benchmarks/bench_speed_limit.py``). None where a copy cannot be made (a sharded
        model: FSDP2 must gather its own parameters), and autocast is used instead."""
        import copy

        if self.is_sharded():
            return None
        try:
            return _CastInputs(copy.deepcopy(self.net).to(torch.bfloat16), torch.bfloat16)
        except Exception:  # a net that cannot be copied (e.g. holding a handle): autocast serves it too
            return None

    def sample_trajectory(self, num_samples: int, *, num_frames: int = 8, y: Tensor | None = None,
                          generator: torch.Generator | None = None, **options: Any) -> Tensor:
        """The denoising trajectory of ``sample(num_samples, ...)``: ``[num_frames, N, *data_shape]``.

        Frames are the denoised estimates ``x0_hat`` at ``num_frames - 1`` network evaluations
        evenly spaced from the first (pure noise) to the last, then the final samples; images in
        [-1, 1]. Options are :meth:`sample`'s. Every evaluation is kept until the end (memory
        ``NFE x N x D`` floats): use few samples.
        """
        if num_frames < 2:
            raise ValueError(f"{type(self).__name__}.sample_trajectory: num_frames must be >= 2, got {num_frames}")
        recorded: list[Tensor] = []
        final = self.sample(num_samples, y=y, generator=generator,
                            callback=lambda step: recorded.append(step["denoised"].detach().clone()), **options)
        if not recorded:
            raise NotImplementedError(f"{type(self).__name__} does not sample through a denoiser: no trajectory")
        picks = torch.linspace(0, len(recorded) - 1, num_frames - 1).round().long().tolist()
        frames = [recorded[i] for i in picks] + [final]
        if self.is_image:
            frames = [f.clamp(-1, 1) for f in frames]
        return torch.stack(frames)


def run_sampler(sampler: str, denoise_fn: samplers.Denoiser, energy_fn: samplers.EnergyFn | None, process,
                shape: tuple[int, ...], modules: list[torch.nn.Module],
                **options: Any) -> tuple[samplers.SamplerOutput, list[float] | None, list[float] | None]:
    """Run sampler ``sampler`` on ``denoise_fn`` (and, for a sampler that runs MCMC on the energy,
    ``energy_fn``) over ``process`` with ``modules`` (the nets it evaluates) in eval mode: the one
    driver of :meth:`GaussianDiffusionModel.draw_samples` and of a
    :class:`~lightning_diffusion.models.compose.Composition`. Returns the sampler's output and, for
    an MCMC sampler (``annealed_mcmc``), the acceptance rate and the step (``step_scale``, adapted) of
    each level after the first (else None, None); the user's ``callback`` (in ``options``) still sees every step."""
    acceptance: list[float] | None = None
    step_scale: list[float] | None = None
    if samplers.registered(sampler).needs_energy:  # MCMC on the energy: record each level's acceptance and step
        acceptance, step_scale, user_callback = [], [], options.pop("callback", None)

        def callback(step: dict) -> None:
            if step["i"]:
                acceptance.append(step["acceptance"])
                step_scale.append(step["step_scale"])
            if user_callback is not None:
                user_callback(step)

        options = {**options, "callback": callback, "energy_fn": energy_fn}
    with contextlib.ExitStack() as stack:
        for module in modules:
            stack.enter_context(evaluating(module))
        out = samplers.sample(sampler, denoise_fn, process, shape, **options)
    return out, acceptance, step_scale


def check_precision(precision: str) -> None:
    """Raise :class:`~lightning_diffusion.errors.OptionError` unless ``precision`` is one of
    :data:`SAMPLE_PRECISIONS`."""
    if precision not in SAMPLE_PRECISIONS:
        raise OptionError("precision", precision, f"must be one of {list(SAMPLE_PRECISIONS)}",
                          "32: the net in float32 (exact); bf16: the net in bfloat16")


def uniform_steps(batch: int, timesteps: int, generator: torch.Generator | None, device) -> Tensor:
    """Integer steps drawn uniformly from ``{0, ..., timesteps - 1}``, shape [B]."""
    return torch.randint(0, timesteps, (batch,), generator=generator, device=device)


class _CastInputs(torch.nn.Module):
    """``net`` with its floating-point inputs cast to ``dtype`` (labels and integers as they are)."""

    def __init__(self, net: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.inner, self.dtype = net, dtype

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return self.inner(x.to(self.dtype), *args, **kwargs)
