"""DDPM (Ho et al. 2020): discrete-time Gaussian diffusion trained with the simple loss."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_diffusion.diffusion.samplers import SAMPLERS, AncestralVariance
from lightning_diffusion.diffusion.schedules import BetaSchedule, NoiseSchedule, Parameterization
from lightning_diffusion.models.base import GenerativeModel, data_noise, uniform_steps


class DDPM(GenerativeModel):
    """Denoising diffusion probabilistic model over any data shape.

    The net is called as ``net(x_t, t, y)`` with ``t`` the integer step index in ``[0, T)`` as
    float, and predicts ``eps``, ``x0`` or ``v`` (``parameterization``). Training minimises the
    simple loss ``E_{t, x0, eps} || target - net(x_t, t) ||^2`` (Ho et al. eq. 14), averaged over
    elements.
    """

    def __init__(
        self,
        net: nn.Module,
        timesteps: int = 1000,
        beta_schedule: BetaSchedule = "linear",
        parameterization: Parameterization = "eps",
        variance: AncestralVariance = "fixedlarge",
        class_conditional: bool = False,
        label_dropout: float = 0.1,
        **kwargs: Any,
    ):
        """
        Args:
            net: denoising network ``net(x, t, y=None) -> Tensor`` with the shape of x.
            timesteps: number of diffusion steps T (Ho et al.: 1000).
            beta_schedule: ``linear`` (Ho et al.) or ``cosine`` (Nichol & Dhariwal).
            parameterization: what the net predicts: ``eps`` (noise), ``x0`` (clean data) or
                ``v`` (velocity, Salimans & Ho).
            variance: reverse-process variance in ancestral sampling: ``fixedlarge`` (beta_t) or
                ``fixedsmall`` (posterior variance beta-tilde_t).
            class_conditional: feed the labels ``y`` of the batch to the net.
            label_dropout: with ``class_conditional``, the probability of replacing a label by the
                null label -1 in training (classifier-free guidance, Ho & Salimans 2022).
            **kwargs: data facts and optimizer settings of :class:`GenerativeModel`.
        """
        super().__init__(**kwargs)
        self.save_hyperparameters_except("net")
        self.net = net
        self.schedule = NoiseSchedule(beta_schedule, timesteps)
        self.parameterization, self.variance = parameterization, variance
        self.class_conditional, self.label_dropout = class_conditional, label_dropout
        if class_conditional and self.num_classes is None:
            raise ValueError("DDPM: class_conditional=True needs num_classes (labelled data)")

    def _labels(self, batch: dict[str, Tensor], generator: torch.Generator | None) -> Tensor | None:
        if not self.class_conditional:
            return None
        if "y" not in batch:
            raise KeyError("DDPM: class_conditional=True but the batch has no key 'y'")
        y = batch["y"]
        if self.training and self.label_dropout > 0:
            drop = torch.rand(y.shape, generator=generator, device=y.device) < self.label_dropout
            y = torch.where(drop, torch.full_like(y, -1), y)
        return y

    def loss(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> Tensor:
        x0 = batch["x"]
        t = uniform_steps(x0.shape[0], self.schedule.timesteps, generator, x0.device)
        noise = data_noise(x0.shape, generator, x0)
        x_t = self.schedule.q_sample(x0, t, noise)
        output = self.net(x_t, t.float(), self._labels(batch, generator))
        target = self.schedule.target(self.parameterization, x0, noise, t)
        return (output.float() - target.float()).pow(2).mean()

    def denoise(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """x0_hat(x_t, t): the net's output converted to a clean-data estimate."""
        output = self.net(x_t, t, y)
        return self.schedule.predict_x0(self.parameterization, output.float(), x_t, t.long())

    @torch.no_grad()
    def sample(self, num_samples: int, *, y: Tensor | None = None, generator: torch.Generator | None = None,
               sampler: str = "ancestral", **options: Any) -> Tensor:
        """Draw samples with a named sampler (``ancestral``); images come back in [-1, 1].

        ``y`` [num_samples] conditions a class-conditional model (-1: unconditional).
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
        shape = (num_samples, *self.require_data_shape())
        if y is not None:
            y = y.to(self.device)
        was_training = self.training
        self.eval()
        try:
            options.setdefault("variance", self.variance)
            options.setdefault("clip", (-1.0, 1.0) if self.is_image else None)
            x = SAMPLERS[sampler](lambda x_t, t: self.denoise(x_t, t, y), self.schedule, shape,
                                  generator=generator, device=self.device, **options)
        finally:
            self.train(was_training)
        return x.clamp(-1, 1) if self.is_image else x
