"""The Gaussian-diffusion layer of DDPM and ScoreSDE: a denoiser ``x0_hat(x_t, t)`` over a
:class:`~lightning_diffusion.diffusion.sde.GaussianProcess`, classifier-free guidance, the sampler
driver and the denoising trajectory.

A family of this layer implements ``denoise(x_t, t, y)`` and calls :meth:`draw_samples` with its
process from ``sample``; every sampler of :mod:`~lightning_diffusion.diffusion.samplers` then serves
it (DEVELOPERS.md, "The diffusion math in one form").
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from lightning_diffusion.diffusion import samplers
from lightning_diffusion.errors import OptionError
from lightning_diffusion.models.base import SAMPLE_ARGUMENTS, GenerativeModel
from lightning_diffusion.models.guidance import guided
from lightning_diffusion.modes import evaluating
from lightning_diffusion.options import check_call, options_of

#: the arithmetic of the net while sampling (``sample(..., precision=...)``)
SAMPLE_PRECISIONS = ("32", "bf16")

#: options of ``sample`` that the sampler driver (:meth:`GaussianDiffusionModel.draw_samples`) takes
#: itself; the rest go to the sampler
DRIVER_OPTIONS = ("clip", "precision")

#: the net a diffusion family uses for each kind of data: (name, class_path)
DIFFUSION_NETS = {"images": ("UNet", "UNet"), "points": ("MLP", "lightning_diffusion.MLP")}

#: the callbacks' fast sampler (:meth:`GaussianDiffusionModel.preview_sample_options`): DPM-Solver++(2M)
#: at 20 steps, which matches 1000-step ancestral sampling in the sampler benchmark (README, "Samplers:
#: quality versus NFE": 0.68 vs 0.73 with the exact denoiser, 1.02 vs 1.16 for the trained sde_vp_toy2d)
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

    def __init__(self, class_conditional: bool = False, label_dropout: float = 0.1, **kwargs: Any):
        """
        Args:
            class_conditional: feed the labels ``y`` of the batch to the net.
            label_dropout: with ``class_conditional``, the probability of replacing a label by the
                null label -1 in training (classifier-free guidance, Ho & Salimans 2022).
            **kwargs: data facts and optimizer settings of :class:`GenerativeModel`.
        """
        super().__init__(**kwargs)
        self.set_conditioning(class_conditional, label_dropout)
        self.last_sample_nfe: int | None = None
        self._trajectory_frames: list[Tensor] | None = None

    #: the family's :class:`~lightning_diffusion.diffusion.sde.GaussianProcess` (DDPM: its
    #: ``DiscreteVP``; ScoreSDE: its ``sde``)
    process: Any

    # -- the family's denoiser --------------------------------------------------------------
    def denoise(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """``x0_hat(x_t, t)``: the clean-data estimate of a diffusion family at its time t [B]."""
        raise NotImplementedError

    def guided_denoiser(self, y: Tensor | None = None, guidance_scale: float = 1.0) -> Callable[[Tensor, Tensor], Tensor]:
        """``denoise_fn(x_t, t) -> x0_hat`` for the samplers.

        With ``guidance_scale = w != 1`` (classifier-free guidance, Ho & Salimans 2022):
        ``x0_hat = x0_hat(x_t | null) + w (x0_hat(x_t | y) - x0_hat(x_t | null))``, both from one
        forward pass of the 2B batch ``(y, -1)``. ``w = 1`` is the conditional model, ``w = 0`` the
        unconditional one.
        """
        if guidance_scale != 1.0 and (not self.class_conditional or y is None):
            raise ValueError(f"{type(self).__name__}.sample: guidance_scale={guidance_scale} needs a class_conditional model "
                             "and labels y; use guidance_scale=1.0 otherwise")
        return guided(self.denoise, y, guidance_scale)

    def preview_sample_options(self) -> dict[str, Any]:
        """The callbacks' fast default: ``{sampler: dpm_solver, steps: S}``, S = 20 network calls on a
        VP SDE, a VE SDE or a DDPM's linear schedule. S keeps the log-SNR step of the benchmarked
        20-step grid (:data:`PREVIEW_LOGSNR_STEP`), so a process whose log-SNR spans more gets more,
        at most 50: sub-VP at ``t_eps`` 1e-5 32 (at 20 steps its energy distance with the exact
        denoiser was 3x the converged one, at 32 within 15%), a cosine DDPM 25. A DDPM of at most
        20 timesteps gets ``{}``: its own default, ancestral over all T steps, takes no more
        network calls and is the model's exact reverse process."""
        process = self.process
        if process.discrete and int(process.t_max) + 1 <= PREVIEW_STEPS:
            return {}
        ratio = process.ratio(torch.tensor([float(process.t_max), float(process.t_min)], dtype=torch.float64))
        span = float(ratio[0].log() - ratio[1].log())  # the log-SNR range the sampler crosses
        steps = min(PREVIEW_MAX_STEPS, max(PREVIEW_STEPS, math.ceil(span / PREVIEW_LOGSNR_STEP - 1e-9)))
        return {"sampler": PREVIEW_SAMPLER, "steps": steps}

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
        samplers.check_options(name, self.process, steps, also=(*own, *DRIVER_OPTIONS),
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
        model), its output cast back to float32: 1.4-1.8x the samples/s of a CPU with avx512_bf16 on
        the digits UNet (``benchmarks/bench_speed_limit.py``). The solver's own arithmetic (the
        update of ``x_t``, the grid) stays float32 either way, so only the denoiser's rounding changes.

        The number of network evaluations is stored in ``last_sample_nfe`` (a guided evaluation
        counts once, though it runs a 2B batch).
        """
        if sampler == "ode":
            self.require_fixed_steps("sample(sampler='ode')", "a fixed-step sampler (ddim, heun, dpm_solver, ...)")
        shape = (num_samples, *self.require_data_shape())
        y = None if y is None else y.to(self.device)
        clip = options.pop("clip", (-1.0, 1.0) if self.is_image else None)
        denoise_fn = self.guided_denoiser(y, guidance_scale)
        bf16_net = None
        if precision == "bf16":
            bf16_net = self._bf16_copy_of_net()
            exact = denoise_fn

            def denoise_fn(x_t: Tensor, t: Tensor) -> Tensor:
                with torch.autocast(x_t.device.type, dtype=torch.bfloat16, enabled=bf16_net is None):
                    x0 = exact(x_t, t)
                return x0.float()
        else:
            check_precision(precision)
        frames = self._trajectory_frames
        if frames is not None:  # sample_trajectory is recording
            guided = denoise_fn

            def denoise_fn(x_t: Tensor, t: Tensor) -> Tensor:
                x0 = guided(x_t, t)
                frames.append(x0.detach().clone())
                return x0

        net = self.net
        try:
            if bf16_net is not None:
                self.net = bf16_net  # for this call only: the family's denoise calls self.net
            with evaluating(self):
                out = samplers.sample(sampler, denoise_fn, process, shape, steps=steps,
                                      generator=generator, device=self.device, clip=clip, **options)
        finally:
            self.net = net
        self.last_sample_nfe = out.nfe
        return out.x.clamp(-1, 1) if self.is_image else out.x

    def _bf16_copy_of_net(self) -> torch.nn.Module | None:
        """A bfloat16 copy of the net (current weights) whose float inputs are cast to bf16, for one
        ``sample(precision="bf16")`` call: its convolutions then skip autocast's per-call weight casts
        (1.1x autocast's samples/s on the digits UNet). None where a copy cannot be made (a sharded
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
        self._trajectory_frames = []
        try:
            final = self.sample(num_samples, y=y, generator=generator, **options)
            recorded = self._trajectory_frames
        finally:
            self._trajectory_frames = None
        if not recorded:
            raise NotImplementedError(f"{type(self).__name__} does not sample through a denoiser: no trajectory")
        picks = torch.linspace(0, len(recorded) - 1, num_frames - 1).round().long().tolist()
        frames = [recorded[i] for i in picks] + [final]
        if self.is_image:
            frames = [f.clamp(-1, 1) for f in frames]
        return torch.stack(frames)


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
