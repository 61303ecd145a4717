"""Composition of Gaussian-diffusion models by adding their energies (issue 23, item 3): products of
models, and conditional products ``E(x|a) + E(x|b) - E(x)`` of one model with separately dropped
conditions (Du et al. 2023, "Reduce, Reuse, Recycle"; Liu et al. 2022, "Compositional visual
generation with composable diffusion models").

A :class:`Composition` of terms ``(model_i, y_i, w_i)`` on one shared Gaussian process is the model
whose energy at every noise level is ``E(x_t, t) = sum_i w_i E_i(x_t, t, y_i)``, so its score is
``sum_i w_i score_i``. It samples with every sampler of
:mod:`~lightning_diffusion.diffusion.samplers`: the denoiser samplers on the summed score (written
as a denoiser, :meth:`Composition.denoise`), ``annealed_mcmc`` on the summed energy. The sum of the
diffused terms is not the diffusion of their product (Du et al. 2023, sec. 3): only at the last
noise level is it the product's energy, so the plain score sum samples a distorted product, and
the MCMC moves of ``annealed_mcmc`` at each level are what pull the samples to it.
"""

# No `from __future__ import annotations`: Term's fields must be evaluated types for the API reference
# (as in diffusion/samplers.py).
import math
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from lightning_diffusion.diffusion import samplers
from lightning_diffusion.diffusion.schedules import append_dims
from lightning_diffusion.errors import OptionError
from lightning_diffusion.models.gaussian_diffusion import DRIVER_OPTIONS, GaussianDiffusionModel, run_sampler


class Term(NamedTuple):
    """One term of a :class:`Composition`: ``weight * E(x_t, t | y)`` of ``model``."""

    #: a DDPM or ScoreSDE (any parameterization; ``energy`` for the MCMC sampler and :meth:`Composition.energy`)
    model: GaussianDiffusionModel
    #: the labels this term conditions on, [num_samples, ...] (-1: the null label, that condition dropped); None: none
    y: Tensor | None = None
    #: its weight in the sum of energies (scores); negative allowed (the unconditional term of a conditional product)
    weight: float = 1.0


def _same_process(a: Any, b: Any) -> bool:
    """Whether two Gaussian processes are the same: same class, time range and, on 65 times of it,
    the same alpha and sigma. (Our processes define no equality; comparing their coefficients covers
    every parameter, a DDPM schedule's betas included.)"""
    if type(a) is not type(b) or (a.t_min, a.t_max, a.discrete) != (b.t_min, b.t_max, b.discrete):
        return False
    t = torch.linspace(float(a.t_min), float(a.t_max), 65, dtype=torch.float64)
    return all(torch.allclose(f(t), g(t), rtol=1e-9, atol=0.0) for f, g in ((a.alpha, b.alpha), (a.sigma, b.sigma)))


def _describe(i: int, term: Term) -> str:
    process = term.model.process
    return f"term {i} ({type(term.model).__name__} on {type(process).__name__}, t in [{process.t_min:g}, {process.t_max:g}])"


class Composition:
    """The weighted sum of the energies of Gaussian-diffusion models on one shared process,
    ``E(x_t, t) = sum_i w_i E_i(x_t, t, y_i)``, a model that samples like each of its terms.
    Build it with :func:`compose` or :func:`conditional_product`.

    Attributes:
        terms: the terms ``(model, y, weight)``.
        process: the Gaussian process all terms' models share.
        last_sample_nfe: network evaluations of the last :meth:`sample`, each term's counted (a
            sampler's evaluation of the composition counts ``len(terms)``).
        last_sample_acceptance: the Metropolis acceptance rate per noise level of the last
            :meth:`sample` with ``annealed_mcmc`` (None after any other sampler).
        last_sample_step_scale: the step per noise level of that sample, in units of sigma_t^2 (as
            adapted to the target acceptance; None after any other sampler).
    """

    def __init__(self, terms: Sequence[Term]):
        """
        Args:
            terms: the terms ``(model, y, weight)``; their models share one process and data shape.
        """
        self.terms = [Term(*term) for term in terms]
        if not self.terms:
            raise ValueError("compose: no terms; give at least one Term(model, y, weight)")
        for i, term in enumerate(self.terms):
            if not isinstance(term.model, GaussianDiffusionModel):
                raise TypeError(f"compose: term {i}'s model is a {type(term.model).__name__}; a term needs a "
                                "Gaussian-diffusion model (DDPM or ScoreSDE)")
            if not math.isfinite(float(term.weight)):
                raise ValueError(f"compose: term {i}'s weight is {term.weight}; give a finite number")
        first = self.terms[0]
        for i, term in enumerate(self.terms[1:], 1):
            if not _same_process(first.model.process, term.model.process):
                raise ValueError(f"compose: {_describe(i, term)} and {_describe(0, first)} do not share their Gaussian "
                                 "process; only models trained on the same process (same schedule or SDE) compose")
            if term.model.data_shape != first.model.data_shape:
                raise ValueError(f"compose: term {i}'s data_shape {term.model.data_shape} differs from term 0's "
                                 f"{first.model.data_shape}; only models of the same data compose")
        self.process = first.model.process
        self.last_sample_nfe: int | None = None
        self.last_sample_acceptance: list[float] | None = None
        self.last_sample_step_scale: list[float] | None = None

    @property
    def weights(self) -> list[float]:
        """The terms' weights."""
        return [float(term.weight) for term in self.terms]

    # -- the terms' outputs, one net call per model ---------------------------------------------------
    def _per_term(self, method: Callable[[GaussianDiffusionModel], Callable[..., Tensor]], x_t: Tensor, t: Tensor) -> list[Tensor]:
        """``method(model)(x_t, t, y)`` of every term (``method`` picks the model's bound method, e.g.
        its ``denoise``), in term order. The terms of one model whose
        labels are all given (of one shape) go through it in one call on the batch of their copies of
        ``x_t`` (as classifier-free guidance's 2B batch); other terms one call each."""
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        outputs: list[Tensor | None] = [None] * len(self.terms)
        groups: dict[int, list[int]] = {}
        for i, term in enumerate(self.terms):
            groups.setdefault(id(term.model), []).append(i)
        for indices in groups.values():
            model = self.terms[indices[0]].model
            ys = [self._labels(i, x_t) for i in indices]
            if len(indices) > 1 and all(y is not None and y.shape == ys[0].shape for y in ys):
                both = method(model)(torch.cat([x_t] * len(ys)), torch.cat([t] * len(ys)), torch.cat(ys))
                for i, part in zip(indices, both.chunk(len(ys))):
                    outputs[i] = part
            else:
                for i, y in zip(indices, ys):
                    outputs[i] = method(model)(x_t, t, y)
        return outputs  # type: ignore[return-value]

    def _labels(self, i: int, x_t: Tensor) -> Tensor | None:
        y = self.terms[i].y
        if y is None:
            return None
        if y.shape[0] != x_t.shape[0]:
            raise ValueError(f"Composition: term {i}'s labels y have {y.shape[0]} rows for a batch of {x_t.shape[0]}; "
                             "give one label row per sample ([num_samples, ...])")
        return y.to(x_t.device)

    def without_energy(self) -> list[int]:
        """The indices of the terms whose model has no energy (a parameterization other than ``energy``)."""
        return [i for i, term in enumerate(self.terms) if term.model.sampling_energy() is None]

    def energy(self, x_t: Tensor, t: Tensor) -> Tensor:
        """``E(x_t, t) = sum_i w_i E_i(x_t, t, y_i)`` [B] in nats (up to a constant of t) at the process's
        time t [B] (or a scalar); differentiable in ``x_t`` where gradients are on. ValueError if a
        term's model has no energy, naming the term and its parameterization."""
        missing = self.without_energy()
        if missing:
            term = self.terms[missing[0]]
            raise ValueError(f"Composition.energy: term {missing[0]}'s {type(term.model).__name__} has parameterization "
                             f"{term.model.parameterization!r}, which has no energy; compose models trained with "
                             "parameterization: energy")
        return sum(w * e for w, e in zip(self.weights, self._per_term(lambda model: model.energy, x_t, t)))

    def denoise(self, x_t: Tensor, t: Tensor) -> Tensor:
        """The x0_hat whose score is ``sum_i w_i score_i``: with ``score_i = (alpha x0_i - x_t) / sigma^2``,
        ``x0_hat = sum_i w_i x0_i + (1 - sum_i w_i) x_t / alpha`` (the identity of
        :func:`combine_denoised`), at the process's time t [B] (or a scalar), float32 or wider."""
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        alpha = append_dims(self.process.alpha(t), x_t.ndim).to(x_t.device)
        return combine_denoised(self._per_term(lambda model: model.denoise, x_t, t), self.weights, x_t, alpha)

    # -- sampling ------------------------------------------------------------------------------------
    def check_sample_options(self, sampler: str | None = None, steps: int | None = None, **options: Any) -> None:
        """Raise :class:`~lightning_diffusion.errors.OptionError` unless :meth:`sample` takes these
        options: the models' own check (:func:`~lightning_diffusion.diffusion.samplers.check_options`:
        a known sampler, only its options, a step count its grid allows on the shared process), the
        driver's ``clip`` and ``callback``, and an energy in every term for a sampler that needs one."""
        name, steps = self.terms[0].model._sampler_steps(sampler, steps)
        if samplers.registered(name).needs_energy and self.without_energy():
            i = self.without_energy()[0]
            model = self.terms[i].model
            raise OptionError("sampler", name, f"the {name} sampler runs MCMC on the composition's energy, and term {i}'s "
                              f"{type(model).__name__} (parameterization {model.parameterization!r}) has none",
                              "compose models trained with parameterization: energy, or choose a sampler that needs only "
                              "the denoiser (" + ", ".join(n for n, e in samplers.SAMPLERS.items() if not e.needs_energy) + ")")
        samplers.check_options(name, self.process, steps, also=("sampler", "clip"), energy=not self.without_energy(),
                               **{k: v for k, v in options.items() if k not in DRIVER_OPTIONS})
        unknown = [k for k in options if k in DRIVER_OPTIONS and k not in ("clip", "callback")]
        if unknown:
            raise OptionError(unknown[0], options[unknown[0]], "Composition.sample has no such option",
                              "leave it out (a composition samples its nets in float32)")

    def sample(self, num_samples: int, *, generator: torch.Generator | None = None, sampler: str | None = None,
               steps: int | None = None, **options: Any) -> Tensor:
        """Draw ``num_samples`` samples of the composition with a named sampler of
        :mod:`~lightning_diffusion.diffusion.samplers` (None: term 0's model's default sampler and
        steps); images come back in [-1, 1].

        Args:
            num_samples: how many samples; each term's labels y have this many rows.
            generator: source of the sampling noise.
            sampler: the sampler's name; ``annealed_mcmc`` runs MCMC on :meth:`energy`, every other
                sampler runs on :meth:`denoise` (the summed score).
            steps: the sampler's step count (None: its default).
            **options: the sampler's own options, ``clip`` (x0_hat's range; default (-1, 1) for
                images, none for points) and ``callback``.

        Sets ``last_sample_nfe`` (each term's network evaluation counted) and, for ``annealed_mcmc``,
        ``last_sample_acceptance`` (one rate per level after the first) and ``last_sample_step_scale``
        (each level's adapted step).
        """
        self.check_sample_options(sampler=sampler, steps=steps, **options)
        first = self.terms[0].model
        name, steps = first._sampler_steps(sampler, steps)
        if name == "ancestral" and hasattr(first, "variance"):  # a DDPM's own sample does the same
            options.setdefault("variance", first.variance)
        for i, term in enumerate(self.terms):
            if term.y is not None and term.y.shape[0] != num_samples:
                raise ValueError(f"Composition.sample: term {i}'s labels y have {term.y.shape[0]} rows for "
                                 f"num_samples={num_samples}; give one label row per sample")
        shape = (num_samples, *first.require_data_shape())
        clip = options.pop("clip", (-1.0, 1.0) if first.is_image else None)
        models = list({id(term.model): term.model for term in self.terms}.values())
        energy_fn = self.energy if samplers.registered(name).needs_energy else None
        out, acceptance, step_scale = run_sampler(name, self.denoise, energy_fn, self.process, shape, models,
                                                  steps=steps, generator=generator, device=first.device, clip=clip,
                                                  **options)
        self.last_sample_nfe, self.last_sample_acceptance = out.nfe * len(self.terms), acceptance
        self.last_sample_step_scale = step_scale
        return out.x.clamp(-1, 1) if first.is_image else out.x


def combine_denoised(denoised: Sequence[Tensor], weights: Sequence[float], x_t: Tensor, alpha: Tensor) -> Tensor:
    """The denoiser of a weighted sum of scores: with ``score_i = (alpha x0_i - x_t) / sigma^2``,
    ``sum_i w_i score_i = (alpha x0 - x_t) / sigma^2`` for ``x0 = sum_i w_i x0_i + (1 - sum_i w_i) x_t / alpha``.
    ``denoised``: the x0_i [B, ...]; ``weights``: the w_i; ``alpha``: alpha(t) broadcastable to x_t.
    Weights summing to 1 (classifier-free guidance's ``w, 1 - w``) leave no x_t term."""
    total = sum(weights)
    x0 = sum(w * d for w, d in zip(weights, denoised))
    return x0 + (1.0 - total) * x_t.to(x0.dtype) / alpha.to(x0.dtype) if total != 1.0 else x0


def compose(terms: Sequence[Term]) -> Composition:
    """The product of models: :class:`Composition` of ``terms`` ``(model, y, weight)``, its energy
    ``sum_i w_i E_i(x_t, t, y_i)``. All models share one Gaussian process (ValueError naming the terms
    that differ otherwise) and data shape."""
    return Composition(terms)


def conditional_product(model: GaussianDiffusionModel, ys: Sequence[Tensor], null: Tensor | None = None,
                        weights: Sequence[float] | None = None) -> Composition:
    """The conditional product of one model: ``sum_i w_i E(x|y_i) - (sum_i w_i - 1) E(x|null)``, with
    unit weights ``E(x|a) + E(x|b) - (n - 1) E(x)``: the terms ``(model, y_i, w_i)`` and ``(model,
    null, -(sum w - 1))`` (left out when that weight is 0). By Bayes' rule, with conditions independent
    given x, ``p(x | a, b) ∝ p(x | a) p(x | b) / p(x)``.

    Args:
        model: a class-conditional DDPM or ScoreSDE trained with label dropout.
        ys: the labels of each condition, each [num_samples, ...] (for per-attribute labels, the
            other attributes -1: dropped).
        null: the labels of the unconditional term (default: ``ys[0]`` filled with -1).
        weights: the weight w_i of each condition (default 1 each).
    """
    if not ys:
        raise ValueError("conditional_product: no labels; give one tensor of labels per condition")
    weights = [1.0] * len(ys) if weights is None else [float(w) for w in weights]
    if len(weights) != len(ys):
        raise ValueError(f"conditional_product: {len(weights)} weights for {len(ys)} conditions; give one weight per "
                         "condition")
    null = torch.full_like(ys[0], -1) if null is None else null
    terms = [Term(model, y, w) for y, w in zip(ys, weights)]
    null_weight = -(sum(weights) - 1.0)
    if null_weight != 0.0:
        terms.append(Term(model, null, null_weight))
    return Composition(terms)
