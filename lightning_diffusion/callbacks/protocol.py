"""What the callbacks need from a model: the contract of DESIGN.md as ``typing.Protocol``s.

A LightningModule of any origin (not necessarily a subclass of ours) that has ``sample`` and
``bits_per_dim`` gets EMA, SampleQuality, Likelihood and WandbSamples; the optional hooks add
reconstructions, denoising trajectories, a density heat map and the name of the likelihood
estimator to the logs.
Callbacks test for the optional hooks with ``isinstance(module, Reconstructs)`` etc.

What the callbacks do for the model, so that it need not: they call ``sample`` and
``bits_per_dim`` in eval mode (dropout off) on the evaluation weights (the EMA averages with an
:class:`~lightning_diffusion.callbacks.ema.EMA` callback) and under ``torch.no_grad()`` (a
likelihood that needs gradients, such as an ODE divergence, enables them inside). Optional
attributes: a model with ``class_conditional = True`` and ``num_classes`` gets balanced labels ``y``
from SampleQuality.

Batches: the callbacks read real data as :func:`batch_x` does: ``batch["x"]`` of a batch dict (the
contract of DESIGN.md), the first item of a tuple or list, or the batch itself if it is a tensor.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class GenerativeModule(Protocol):
    """The required contract."""

    def sample(self, num_samples: int, *, y: Tensor | None = None, generator: torch.Generator | None = None,
               **options: Any) -> Tensor:
        """``num_samples`` samples in data space: images [N, C, H, W] in [-1, 1], points [N, D]."""

    def bits_per_dim(self, x: Tensor, **options: Any) -> Tensor:
        """Negative log-likelihood (or a bound on it) of each sample of ``x`` in bits/dim, [B]."""


@runtime_checkable
class Reconstructs(Protocol):
    """Optional: models with an encoder (VAE, HVAE)."""

    def reconstruct(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Reconstructions of ``x`` in data space, shaped like ``x``."""


@runtime_checkable
class HasTrajectory(Protocol):
    """Optional: iterative samplers (DDPM, ScoreSDE)."""

    def sample_trajectory(self, num_samples: int, *, num_frames: int = 8, y: Tensor | None = None,
                          generator: torch.Generator | None = None, **options: Any) -> Tensor:
        """Intermediate states of sampling, ``[num_frames, N, *data_shape]``, the last the samples."""


@runtime_checkable
class HasDensity(Protocol):
    """Optional: a normalised density that can be evaluated on a 2-D grid (the EBM)."""

    def density_grid(self, bounds: tuple[tuple[float, float], tuple[float, float]], num: int = 201) -> Any:
        """The model's normalised log density on a ``num`` x ``num`` grid over ``bounds``
        ``((x_lo, x_hi), (y_lo, y_hi))``: an object with ``log_density`` [num, num] (rows are y) in
        nats and ``log_z``."""


@runtime_checkable
class NamesEstimator(Protocol):
    """Optional: the name of the likelihood estimator behind ``bits_per_dim(x, **options)``."""

    def bpd_estimator(self, **options: Any) -> str:
        """e.g. ``elbo``, ``iwae-100``, ``vlb``, ``ode``."""


def batch_x(batch: Any) -> Tensor | None:
    """The data tensor of a batch: ``batch["x"]`` of a dict, the first item of a tuple or list, a
    tensor itself; None if there is none."""
    if isinstance(batch, dict):
        return batch.get("x")
    if isinstance(batch, (tuple, list)):
        return batch[0] if batch else None
    return batch if isinstance(batch, Tensor) else None


def estimator_name(module: Any, **options: Any) -> str:
    """``module.bpd_estimator(**options)`` if the model names its estimator, else ``bpd``."""
    return module.bpd_estimator(**options) if isinstance(module, NamesEstimator) else "bpd"
