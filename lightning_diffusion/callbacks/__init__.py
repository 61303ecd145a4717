"""Callbacks that use only the model contract (sample / bits_per_dim)."""

from lightning_diffusion.callbacks.checkpoint import LastCheckpoint
from lightning_diffusion.callbacks.samples import SampleGrid

__all__ = ["LastCheckpoint", "SampleGrid"]
