"""Discrete (categorical) diffusion: multinomial (uniform) and absorbing (masked) corruption of integer data.

The family of D3PM (Austin et al. 2021), multinomial diffusion (Hoogeboom et al. 2021), MDLM / MD4
(Sahoo et al. 2024, Shi et al. 2024) and SUNDAE (Savinov et al. 2022) on one model, over the math of
:mod:`lightning_diffusion.discrete` (log space throughout). The data are int64 categories in [0, K):
images [C, H, W] (the digits' 8-bit pixels, K = 256; binarized digits, K = 2) or sequences [L]
(characters). The net maps ``(x_t, t, y)`` to x0 logits over the K categories per position, with
``t`` the time fraction in [0, 1] and x_t holding K + 1 states (index K is the mask).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_diffusion.discrete import bound, samplers
from lightning_diffusion.discrete.processes import AbsorbingDiffusion, CategoricalProcess, UniformDiffusion
from lightning_diffusion.encodings import categories_from_images, images_from_categories
from lightning_diffusion.errors import OptionError
from lightning_diffusion.likelihoods import nats_to_bits_per_dim
from lightning_diffusion.models.base import SAMPLE_ARGUMENTS, GenerativeModel, full_precision
from lightning_diffusion.models.guidance import guided
from lightning_diffusion.modes import evaluating
from lightning_diffusion.options import Positive, PositiveInt, check_call, check_number, options_of, registered

Corruption = Literal["uniform", "absorbing"]
Loss = Literal["vlb", "hybrid", "masked_elbo"]
#: the discrete samplers' names (:data:`~lightning_diffusion.discrete.samplers.SAMPLERS`), as the CLI's type
Sampler = Literal[tuple(samplers.SAMPLERS)]
#: arguments of a discrete sampler that :meth:`DiscreteDiffusion.sample` gives itself
SAMPLER_ARGUMENTS = ("denoiser", "process", "shape", "steps", "temperature", "generator", "device")


class DiscreteDiffusion(GenerativeModel):
    """Diffusion over categorical data, with every reported number an exact, named bound.

    Training losses (per sample, reported as ``train/loss`` in bits per dimension):

    - ``vlb``: an unbiased one-t estimate of the full variational bound,
      ``KL_prior + L_{t-1} / p(t)`` with t uniform in 1..T (or by ``importance_sampling``);
    - ``hybrid``: ``vlb`` + ``hybrid_lambda`` x the x0 cross-entropy at x_t (D3PM eq. 5, lambda = 0.001);
    - ``masked_elbo``: the continuous-time masked ELBO of MDLM/MD4 (``corruption: absorbing``,
      ``timesteps: 0``), t uniform in (0, 1].

    ``unroll_steps > 1`` adds SUNDAE's unrolled denoising: x_t is replaced ``unroll_steps - 1`` times
    by the model's own sample of x0 (no gradient) and the cross-entropy to x0 of the last call is
    added with weight ``unroll_weight``.

    :meth:`bits_per_dim` is an unbiased estimate of the bound in bits per dimension of the discrete data
    (no dequantization: the data are categories): the full discrete-time bound summed exactly over every
    t, each term's expectation over x_t from ``draws`` draws (``vlb``), or in continuous time the masked
    ELBO averaged over ``elbo_samples x draws`` stratified times (``masked-elbo``). :meth:`sample` draws by ancestral sampling
    (Gumbel-max, any ``steps`` on a respaced grid) or SUNDAE's few-step refinement;
    ``last_sample_nfe`` says how many net calls it took.
    """

    resume_fixed_hparams = ("data_shape", "num_categories", "corruption", "timesteps", "schedule",
                            "class_conditional")

    def __init__(
        self,
        net: nn.Module,
        num_categories: int | None = None,
        corruption: Corruption = "absorbing",
        timesteps: int = 1000,
        schedule: str | None = None,
        loss: Loss = "hybrid",
        hybrid_lambda: float = 0.001,
        importance_sampling: bool = False,
        unroll_steps: int = 1,
        unroll_weight: float = 1.0,
        class_conditional: bool = False,
        label_dropout: float = 0.1,
        sampler: Sampler = "ancestral",
        sample_steps: int | None = None,
        temperature: float = 1.0,
        sundae_update_fraction: float = 0.5,
        elbo_samples: int = 128,
        bpd_chunk: int = 16,
        **kwargs: Any,
    ):
        """
        Args:
            net: ``net(x_t [B, *data_shape] int64 in [0, K], t [B] time fraction, y=None) -> logits
                [B, *data_shape, K]`` (:class:`~lightning_diffusion.nets.categorical.CategoricalUNet`,
                :class:`~lightning_diffusion.nets.categorical.SequenceTransformer`).
            num_categories: K, the number of categories of the data (the CLI links it from the data).
            corruption: ``uniform`` (multinomial diffusion / D3PM-uniform) or ``absorbing`` (a mask
                state: D3PM-absorbing, and MDLM/MD4 in continuous time).
            timesteps: T, the number of discrete steps; 0 for continuous time (absorbing only).
            schedule: alpha-bar of the time fraction: ``cosine`` (Hoogeboom et al.; the default for
                uniform) or ``linear`` (``1 - u``: D3PM-absorbing's 1/(T - t + 1), MDLM's log-linear
                noise; the default for absorbing).
            loss: ``vlb``, ``hybrid`` (D3PM's default) or ``masked_elbo`` (continuous time).
            hybrid_lambda: weight of the x0 cross-entropy in ``hybrid`` (D3PM: 0.001).
            importance_sampling: draw t by the bound's terms, ``p_t ∝ sqrt(E[L_t^2])`` (Nichol &
                Dhariwal 2021; Hoogeboom et al. 2021), uniform until each t has 10 values.
            unroll_steps: SUNDAE unrolled denoising steps (1: off; SUNDAE: 2).
            unroll_weight: weight of the unrolled cross-entropy term.
            class_conditional: feed the labels ``y`` to the net (classifier-free guidance in sampling).
            label_dropout: probability of the null label in training, with ``class_conditional``.
            sampler: default sampler of :meth:`sample`: ``ancestral`` or ``sundae``.
            sample_steps: default number of sampler steps (None: T for ancestral, 1000 in continuous
                time; 10 for sundae).
            temperature: default temperature of the x0 logits in sampling (1: the model).
            sundae_update_fraction: share of positions a SUNDAE step updates.
            elbo_samples: stratified times of the continuous-time bound in :meth:`bits_per_dim`.
            bpd_chunk: timesteps per net call in the discrete-time bound (rows ``chunk x batch``).
            **kwargs: :class:`~lightning_diffusion.models.base.GenerativeModel`'s (``lr``, ``warmup_steps``, ...).
        """
        super().__init__(**kwargs)
        self.save_hyperparameters_except("net")
        if num_categories is None:
            raise ValueError("DiscreteDiffusion: num_categories is not set; pass num_categories=K, or let the CLI "
                             "link it from categorical data (data.init_args.categorical: true)")
        if corruption not in ("uniform", "absorbing"):
            raise ValueError(f"DiscreteDiffusion: corruption={corruption!r}; choose uniform or absorbing")
        if loss not in ("vlb", "hybrid", "masked_elbo"):
            raise ValueError(f"DiscreteDiffusion: loss={loss!r}; choose vlb, hybrid or masked_elbo")
        if sampler not in samplers.SAMPLERS:
            raise ValueError(f"DiscreteDiffusion: sampler={sampler!r}; choose one of {list(samplers.SAMPLERS)}")
        for name, value, least in (("timesteps", timesteps, 0), ("unroll_steps", unroll_steps, 1),
                                   ("elbo_samples", elbo_samples, 1), ("bpd_chunk", bpd_chunk, 1)):
            check_number(f"DiscreteDiffusion.{name}", value, least=least, integer=True)
        check_number("DiscreteDiffusion.sample_steps", sample_steps, least=1, integer=True, optional=True)
        continuous = timesteps == 0
        if continuous and corruption != "absorbing":
            raise ValueError("DiscreteDiffusion: continuous time (timesteps=0) is for corruption=absorbing")
        if (loss == "masked_elbo") != continuous:
            raise ValueError(f"DiscreteDiffusion: loss={loss} with timesteps={timesteps}: masked_elbo is the "
                             "continuous-time loss (timesteps: 0), vlb and hybrid the discrete-time ones")
        if importance_sampling and continuous:
            raise ValueError("DiscreteDiffusion: importance_sampling is over discrete steps (timesteps > 0)")
        schedule = schedule or ("cosine" if corruption == "uniform" else "linear")
        kind = UniformDiffusion if corruption == "uniform" else AbsorbingDiffusion
        self.process: CategoricalProcess = kind(num_categories, timesteps or None, schedule)
        self.net = net
        self.num_categories, self.corruption, self.timesteps, self.schedule = num_categories, corruption, timesteps, schedule
        self.loss_name, self.hybrid_lambda = loss, hybrid_lambda
        self.unroll_steps, self.unroll_weight = unroll_steps, unroll_weight
        self.set_conditioning(class_conditional, label_dropout)
        self.sampler, self.sample_steps, self.temperature = sampler, sample_steps, temperature
        self.sundae_update_fraction, self.elbo_samples, self.bpd_chunk = sundae_update_fraction, elbo_samples, bpd_chunk
        #: importance sampling of t (its history is in the state dict, so in checkpoints)
        self.timestep_sampler = bound.TimestepSampler(timesteps) if importance_sampling else None
        self.last_sample_nfe: int | None = None
        self.require_data_shape()

    # -- data and net ------------------------------------------------------------------------
    @property
    def dims(self) -> int:
        """Dimensions (positions) of one sample."""
        return math.prod(self.require_data_shape())

    def check_net(self, net: Any) -> None:
        """Refuse a net that is not categorical (no ``num_categories``) or made for other data."""
        if net is None:
            return
        k = getattr(net, "num_categories", None)
        if k is None:
            raise ValueError(f"DiscreteDiffusion: the net {type(net).__name__} has no num_categories: it is not a "
                             "categorical net; use CategoricalUNet (images) or SequenceTransformer (sequences)")
        if k != self.num_categories:
            raise ValueError(f"DiscreteDiffusion: the net {type(net).__name__} has num_categories={k} but the "
                             f"model (the data) has {self.num_categories}")
        kind = getattr(net, "data_kind", None)
        data = "images" if len(self.require_data_shape()) == 3 else "sequences"
        if kind is not None and kind != data:
            use = "CategoricalUNet" if data == "images" else "SequenceTransformer"
            raise ValueError(f"DiscreteDiffusion: the net {type(net).__name__} takes {kind}, but the data are "
                             f"{data} of shape {list(self.data_shape)}: use {use}")

    def categories(self, x: Tensor, where: str = "batch['x']") -> Tensor:
        """``x`` as int64 categories, refused (naming ``where``) unless integers in [0, K)."""
        if x.dtype.is_floating_point or x.dtype == torch.bool:
            raise TypeError(f"DiscreteDiffusion: {where} has dtype {x.dtype}; the model needs int64 categories "
                            "(data.init_args.categorical: true)")
        if x.numel():
            lo, hi = (int(v) for v in torch.aminmax(x))  # one pass, one sync per batch
            if lo < 0 or hi >= self.num_categories:
                raise ValueError(f"DiscreteDiffusion: {where} holds categories in [{lo}, {hi}], "
                                 f"outside [0, {self.num_categories})")
        return x.long()

    def logits(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """The net's x0 logits [B, *data_shape, K] (float32) at x_t and time fraction ``t`` [B]."""
        t = t.to(torch.get_default_dtype())
        return (self.net(x_t, t) if y is None else self.net(x_t, t, y)).float()

    # -- training ------------------------------------------------------------------------------
    def loss(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> Tensor:
        """The configured loss of a batch (scalar, bits per dimension); ``generator`` fixes its noise."""
        x0 = self.categories(batch["x"])
        y = self.training_labels(batch, generator)
        denoiser = lambda x_t, t: self.logits(x_t, t, y)  # noqa: E731
        b, scale = x0.shape[0], 1 / (self.dims * math.log(2))
        importance = self.timestep_sampler is not None and self.training
        if self.loss_name == "masked_elbo":
            t = 1 - torch.rand(b, generator=generator, device=x0.device, dtype=torch.float64)  # in (0, 1]
            frac = t
            terms = bound.masked_elbo(self.process, denoiser, x0, t=t, generator=generator)
            self._log_terms({"elbo": terms.mean() * scale}, b)
        else:
            if importance:
                t, p = self.timestep_sampler.sample(b, generator)
                t, weight = t.to(x0.device), (1 / p).to(x0.device, torch.float32)
            else:
                t = torch.randint(1, self.timesteps + 1, (b,), generator=generator, device=x0.device)
                weight = torch.full((b,), float(self.timesteps), device=x0.device)
            frac = self.process.fraction(t).to(x0.device)
            x_t = self.process.sample_xt(x0, t, generator)
            logits = denoiser(x_t, frac)
            l_t = bound.kl_term(self.process, x0, x_t, t, logits)
            if importance:
                # every rank records every rank's terms: the histories (and the t they draw) stay equal
                seen = (t, l_t.detach()) if self._trainer is None else (self.all_gather(t).flatten(),
                                                                        self.all_gather(l_t.detach()).flatten())
                self.timestep_sampler.update(*seen)
            terms = bound.prior_kl(self.process, x0).to(l_t) + weight * l_t  # E_t of this: the full bound
            self._log_terms({"vlb": terms.mean() * scale}, b)
            if self.loss_name == "hybrid":
                ce = bound.x0_cross_entropy(x0, logits)
                terms = terms + self.hybrid_lambda * ce
                self._log_terms({"x0_ce": ce.mean() * scale}, b)
        if self.unroll_steps > 1:  # SUNDAE: its own draw of x_t at the same times
            x_t = self.process.sample_xt(x0, t, generator)
            unrolled = bound.x0_cross_entropy(x0, samplers.unroll(denoiser, x_t, frac, self.unroll_steps, generator))
            terms = terms + self.unroll_weight * unrolled
            self._log_terms({"unrolled_ce": unrolled.mean() * scale}, b)
        return terms.mean() * scale

    def _log_terms(self, terms: dict[str, Tensor], batch_size: int) -> None:
        if self._trainer is None:
            return
        split = "train" if self.training else "val"
        for name, value in terms.items():
            self.log(f"{split}/{name}", value.detach(), batch_size=batch_size, sync_dist=not self.training)

    # -- the contract ----------------------------------------------------------------------------
    def check_sample_options(self, **options: Any) -> None:
        """Raise :class:`~lightning_diffusion.errors.OptionError` unless :meth:`sample` takes these
        options: its own by its signature, guidance only on a class-conditional model, a registered
        sampler, the rest by that sampler's signature, and no more ``steps`` than it can take."""
        rest = check_call(self.sample, options, "DiscreteDiffusion.sample", skip=SAMPLE_ARGUMENTS, rest=True)
        self.check_option_rules(options)
        name = options.get("sampler") or self.sampler
        entry = registered(samplers.SAMPLERS, name, "DiscreteDiffusion sampler")
        listed = [*options_of(self.sample, SAMPLE_ARGUMENTS), *options_of(entry.run, SAMPLER_ARGUMENTS)]
        check_call(entry.run, rest, f"the {name} sampler", skip=SAMPLER_ARGUMENTS, listed=listed)
        steps, most = options.get("steps"), entry.most_steps(self.process)
        if steps is not None and most is not None and steps > most:
            raise OptionError("steps", steps, f"must be at most timesteps={most} for {name} sampling")

    #: steps of the callbacks' respaced ancestral default (:meth:`preview_sample_options`): the absorbing
    #: digits model's FID converges by 50 steps (README, "Discrete diffusion: quality against NFE"); 100
    #: leaves a 2x margin for processes that converge more slowly
    preview_steps: int = 100

    def preview_sample_options(self) -> dict[str, Any]:
        """The callbacks' fast default: ancestral sampling on a respaced grid of :attr:`preview_steps`
        steps where the model's own default takes more (T steps, 1000 in continuous time, or
        ``sample_steps``); ``{}`` (the model's own default) where it takes no more, and for a model
        whose default sampler is SUNDAE (few steps by design)."""
        if self.sampler != "ancestral":
            return {}
        own = self.sample_steps or self.timesteps or 1000
        return {"sampler": "ancestral", "steps": self.preview_steps} if own > self.preview_steps else {}

    def guided_logits(self, y: Tensor | None, guidance_scale: float = 1.0):
        """``denoiser(x_t, t) -> logits`` with classifier-free guidance in log space:
        ``log p(x0 | null) + w (log p(x0 | y) - log p(x0 | null))`` (w = 1: the conditional model)."""
        return guided(self.logits, y, guidance_scale, space=lambda logits: torch.log_softmax(logits, -1))

    def to_data(self, categories: Tensor) -> Tensor:
        """Images' categories as the contract's floats in [-1, 1] (``k / (K - 1) * 2 - 1``: the 8-bit
        digits' ``k / 127.5 - 1``); sequences stay int64."""
        if len(self.require_data_shape()) != 3:
            return categories
        return images_from_categories(categories, self.num_categories)

    def sample(self, num_samples: int, *, y: Tensor | None = None, generator: torch.Generator | None = None,
               sampler: str | None = None, steps: PositiveInt | None = None, temperature: Positive | None = None,
               guidance_scale: float = 1.0, as_categories: bool = False, **options: Any) -> Tensor:
        """``num_samples`` samples: images as floats in [-1, 1] (so every image callback works; with
        ``as_categories`` the int64 categories), sequences as int64 [B, L]. ``sampler`` (default the
        model's), ``steps`` (ancestral: <= T on a respaced grid; sundae: default 10), ``temperature``
        of the x0 logits, ``guidance_scale`` with labels ``y``; other ``options`` go to the sampler (sundae's
        ``update_fraction``, default the model's ``sundae_update_fraction``). Stores ``last_sample_nfe``."""
        self.check_sample_options(sampler=sampler, steps=steps, temperature=temperature, guidance_scale=guidance_scale,
                                  as_categories=as_categories, **options)
        if y is not None and not self.class_conditional:
            raise ValueError("DiscreteDiffusion.sample(y=...): the model is not class_conditional")
        entry = samplers.SAMPLERS[sampler or self.sampler]
        temperature = temperature if temperature is not None else self.temperature
        defaults = {"update_fraction": self.sundae_update_fraction}  # the model's defaults of samplers' own options
        own = {k: v for k, v in defaults.items() if k in options_of(entry.run)} | options
        shape = (num_samples, *self.require_data_shape())
        with evaluating(self):
            denoiser = self.guided_logits(y.to(self.device) if y is not None else None, guidance_scale)
            out = entry.run(denoiser, self.process, shape, steps=steps or self.sample_steps or entry.steps(self.process),
                            temperature=temperature, generator=generator, device=self.device, **own)
        self.last_sample_nfe = out.nfe
        return out.x if as_categories else self.to_data(out.x)

    def bpd_estimator(self, **_: Any) -> str:
        """``vlb`` (the full discrete-time bound, every t of T summed) or ``masked-elbo`` (continuous time,
        ``elbo_samples`` stratified times)."""
        return "masked-elbo" if self.process.continuous else "vlb"

    def data_categories(self, x: Tensor) -> Tensor:
        """Data given to :meth:`bits_per_dim`: int64 categories, or images as floats in [-1, 1]
        (the inverse of :meth:`to_data`, e.g. samples), as categories."""
        if x.dtype.is_floating_point and len(self.require_data_shape()) == 3:
            x = categories_from_images(x, self.num_categories)
        return self.categories(x, "x")

    def bpd_labels(self, y: Tensor | None, batch_size: int) -> Tensor | None:
        """The labels of :meth:`bits_per_dim`: ``y`` [B] on the model's device, refused unless the model is
        ``class_conditional`` and there is one label per sample."""
        if y is None:
            return None
        if not self.class_conditional:
            raise ValueError("DiscreteDiffusion.bits_per_dim(y=...): the model is not class_conditional; leave y out")
        if y.shape[0] != batch_size:
            raise ValueError(f"DiscreteDiffusion.bits_per_dim: y has {y.shape[0]} labels for {batch_size} samples; "
                             "give one label per sample")
        return self.condition_labels(y.to(self.device).long())

    @full_precision
    def bits_per_dim(self, x: Tensor, *, generator: torch.Generator | None = None, y: Tensor | None = None,
                     draws: PositiveInt = 1, **options: Any) -> Tensor:
        """An unbiased estimate [B] of the bound on ``-log2 p(x) / D`` of the discrete data ``x`` (no
        dequantization). In discrete time the full bound (D3PM eq. 1): the prior KL and every KL term and the
        decoder term summed exactly over t, each term's expectation over ``x_t ~ q(x_t | x0)`` from ``draws``
        draws; in continuous time the masked ELBO (MDLM eq. 10) at ``elbo_samples x draws`` stratified times.
        Averaged over a dataset one draw is enough (the mean is the bound); a single sample's number scatters
        around its bound by the draws of x_t, a scatter that shrinks as ``1 / sqrt(draws)`` at ``draws`` times
        the cost (use more for per-sample scores, e.g. outlier detection).

        Args:
            x: int64 categories [B, ...] or images as floats in [-1, 1].
            generator: fixes the draws of x_t (and of t in continuous time).
            y: class labels [B] of a class-conditional model (the bound of ``p(x | y)``; -1: the null label,
                the unconditional model); None: the unconditional model.
            draws: x_t draws per term (an integer >= 1)."""
        self.check_bpd_options(draws=draws, **options)
        x0 = self.data_categories(x.to(self.device))
        y = self.bpd_labels(y, x0.shape[0])
        denoiser = lambda x_t, t: self.logits(x_t, t, None if y is None else row_labels(y, x_t.shape[0]))  # noqa: E731
        with evaluating(self):
            if not self.process.continuous:
                nats = bound.variational_bound(self.process, denoiser, x0, generator=generator,
                                               chunk=self.bpd_chunk, draws=draws)["total"]
            else:
                n = self.elbo_samples * draws
                offset = torch.rand((), generator=generator, dtype=torch.float64)
                nats = torch.zeros(x0.shape[0], dtype=torch.float64, device=x0.device)
                for i in range(n):  # stratified: one t in each of n equal bins of (0, 1]
                    t = torch.full((x0.shape[0],), 1 - (i + float(offset)) / n, dtype=torch.float64)
                    nats += bound.masked_elbo(self.process, denoiser, x0, t=t.to(x0.device), generator=generator).double()
                nats = nats / n
        return nats_to_bits_per_dim(nats, self.dims).float()


def row_labels(y: Tensor, rows: int) -> Tensor:
    """The labels ``y`` [B, ...] of the samples for ``rows`` rows of the bound's net calls: the discrete-time
    bound stacks ``rows / B`` timesteps of the batch, row ``j * B + b`` holding sample b
    (:func:`~lightning_diffusion.discrete.bound.variational_bound`), so ``y`` repeats whole."""
    if rows % y.shape[0]:
        raise ValueError(f"DiscreteDiffusion: {rows} rows of x_t for {y.shape[0]} labels")
    return y.repeat(rows // y.shape[0], *([1] * (y.dim() - 1)))
