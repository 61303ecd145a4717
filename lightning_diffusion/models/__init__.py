"""LightningModules of the model families."""

from lightning_diffusion.models.base import GenerativeModel
from lightning_diffusion.models.ddpm import DDPM

__all__ = ["DDPM", "GenerativeModel"]
