"""What the callbacks need from a model: the contract of DESIGN.md as ``typing.Protocol``s.

A LightningModule of any origin (not necessarily a subclass of ours) that has ``sample`` and
``bits_per_dim`` gets EMA, SampleQuality, Likelihood and WandbSamples; the optional hooks add
reconstructions, denoising trajectories and the name of the likelihood estimator to the logs.
Callbacks test for the optional hooks with ``isinstance(module, Reconstructs)`` etc.
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
class NamesEstimator(Protocol):
    """Optional: the name of the likelihood estimator behind ``bits_per_dim(x, **options)``."""

    def bpd_estimator(self, **options: Any) -> str:
        """e.g. ``elbo``, ``iwae-100``, ``vlb``, ``ode``."""


def estimator_name(module: Any, **options: Any) -> str:
    """``module.bpd_estimator(**options)`` if the model names its estimator, else ``bpd``."""
    return module.bpd_estimator(**options) if isinstance(module, NamesEstimator) else "bpd"
