"""Samplers of discrete diffusion: ancestral (Gumbel-max on a respaced grid) and SUNDAE's parallel refinement.

Both take ``denoiser(x_t, t) -> logits [B, *dims, K]`` (``t`` the time fraction [B] in [0, 1]) and a
:class:`~.processes.CategoricalProcess`, and return :class:`SamplerOutput` ``(x, nfe)``: int64 data
[B, *dims] in [0, K) and the number of denoiser calls. :func:`unroll` is SUNDAE's unrolled denoising
for training.
"""

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from lightning_diffusion.discrete.processes import CategoricalProcess, sample_categorical
from lightning_diffusion.errors import OptionError
from lightning_diffusion.sampling import SamplerOutput
from lightning_diffusion.options import Fraction

Denoiser = Callable[[Tensor, Tensor], Tensor]


def time_grid(process: CategoricalProcess, steps: int) -> list:
    """``steps + 1`` times from the prior down to 0: integers rounded from ``linspace(T, 0, steps + 1)``
    (distinct for steps <= T: timestep respacing), or floats ``linspace(1, 0, steps + 1)`` in continuous time."""
    if not isinstance(steps, int) or steps < 1 or (not process.continuous and steps > process.timesteps):
        limit = "" if process.continuous else f" and at most timesteps={process.timesteps}"
        raise OptionError("steps", steps, f"must be a positive integer{limit}")
    if process.continuous:
        return torch.linspace(1, 0, steps + 1, dtype=torch.float64).tolist()
    return torch.linspace(process.timesteps, 0, steps + 1, dtype=torch.float64).round().long().tolist()


def _time(process: CategoricalProcess, t: float, batch: int, device: torch.device | str | None) -> Tensor:
    """The time fraction of ``t`` as the denoiser's [B] float tensor."""
    return process.fraction(torch.full((batch,), t, dtype=torch.float64)).to(device, torch.get_default_dtype())


def ancestral(denoiser: Denoiser, process: CategoricalProcess, shape: tuple[int, ...], *, steps: int | None = None,
              generator: torch.Generator | None = None, device: torch.device | str | None = None,
              temperature: float = 1.0) -> SamplerOutput:
    """Ancestral sampling ``x_s ~ p(x_s | x_t)`` (D3PM eq. 4, :meth:`~.processes.CategoricalProcess.log_posterior`)
    from the prior down :func:`time_grid` (``steps`` defaults to T, or 1000 in continuous time), by Gumbel-max.

    The x0 logits are divided by ``temperature`` (1: the model's distribution). The last step (s = 0) draws
    x0 itself. NFE = steps.
    """
    if temperature <= 0:
        raise OptionError("temperature", temperature, "must be positive")
    grid = time_grid(process, steps if steps is not None else all_steps(process))
    x = process.sample_prior(shape, generator, device)
    for t, s in zip(grid[:-1], grid[1:]):
        logits = denoiser(x, _time(process, t, shape[0], x.device)) / temperature
        x = sample_categorical(process.log_posterior(x, t, s, logits), generator)
    return SamplerOutput(x, len(grid) - 1)


def sundae(denoiser: Denoiser, process: CategoricalProcess, shape: tuple[int, ...], *, steps: int = 10,
           temperature: float = 0.8, update_fraction: Fraction = 0.5, generator: torch.Generator | None = None,
           device: torch.device | str | None = None) -> SamplerOutput:
    """SUNDAE's few-step parallel refinement (Savinov et al. 2022, sec. 3.2): from the prior, each step draws
    every position from ``softmax(logits / temperature)`` and accepts a random ``update_fraction`` of them;
    at the last step every position still in the mask state is accepted too, so the output is data.

    The denoiser sees the time fraction going down ``1, (steps-1)/steps, ..., 1/steps``. NFE = steps.
    For an absorbing process only masked positions are filled (random-order parallel decoding) and
    the denoiser sees the share of each sample still masked as its time (the time at which the linear
    schedule, the absorbing default, masks that share; an approximation for others): an absorbing model is trained
    on masked positions only, so its logits at an unmasked one carry no signal (redrawing them made
    the digits' FID worse with every step: 37, 56, 78 at 4, 8, 16 steps).
    """
    if temperature <= 0 or not 0 < update_fraction <= 1 or not isinstance(steps, int) or steps < 1:
        raise OptionError("sundae", dict(steps=steps, temperature=temperature, update_fraction=update_fraction),
                          "needs steps >= 1, temperature > 0 and update_fraction in (0, 1]")
    x = process.sample_prior(shape, generator, device)
    mask = process.mask_index
    for k in range(steps):
        if mask is None:
            t = _time(process, (steps - k) / steps, shape[0], x.device)
        else:  # the share still masked: the time at which q(x_t | x0) masks that much
            t = (x == mask).flatten(1).float().mean(1).clamp_min(1 / x[0].numel()).to(torch.get_default_dtype())
        logits = denoiser(x, t)
        proposal = sample_categorical(torch.log_softmax(logits.float() / temperature, dim=-1), generator)
        accept = torch.rand(x.shape, generator=generator, device=x.device) < update_fraction
        if mask is not None:
            accept &= x == mask
        if k == steps - 1:
            accept |= x >= process.num_categories
        x = torch.where(accept, proposal, x)
    return SamplerOutput(x, steps)


def all_steps(process: CategoricalProcess) -> int:
    """Ancestral's default step count: T, or 1000 in continuous time."""
    return process.timesteps or 1000


def at_most_t(process: CategoricalProcess) -> int | None:
    """Ancestral's most steps: T (a respaced grid of distinct steps), no bound in continuous time."""
    return None if process.continuous else process.timesteps


class SamplerEntry(NamedTuple):
    """One sampler of :data:`SAMPLERS`: ``run(denoiser, process, shape, *, steps, temperature,
    generator, device, **own)``, its default step count and its most steps (None: no bound), as
    functions of the process; a new sampler is one entry."""

    run: Callable[..., SamplerOutput]
    steps: Callable[[CategoricalProcess], int]
    most_steps: Callable[[CategoricalProcess], "int | None"]


#: the discrete samplers by name
SAMPLERS: dict[str, SamplerEntry] = {
    "ancestral": SamplerEntry(ancestral, all_steps, at_most_t),
    "sundae": SamplerEntry(sundae, lambda process: 10, lambda process: None),
}


def unroll(denoiser: Denoiser, x_t: Tensor, t: Tensor, steps: int, generator: torch.Generator | None = None) -> Tensor:
    """SUNDAE's unrolled denoising (Savinov et al. 2022, sec. 3.1) for training: ``steps - 1`` times replace
    x_t by a draw from the model's own x0 logits (no gradient), then return the logits [B, *dims, K] of the
    last call, the one the loss (cross-entropy to x0) trains. ``t`` is the time fraction [B]; steps = 1 is
    the plain denoiser call."""
    if not isinstance(steps, int) or steps < 1:
        raise OptionError("unroll steps", steps, "must be a positive integer")
    with torch.no_grad():
        for _ in range(steps - 1):
            x_t = sample_categorical(torch.log_softmax(denoiser(x_t, t).float(), dim=-1), generator)
    return denoiser(x_t, t)
