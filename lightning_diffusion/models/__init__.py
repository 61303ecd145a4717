"""LightningModules of the model families."""

from lightning_diffusion.models.base import GenerativeModel
from lightning_diffusion.models.ddpm import DDPM
from lightning_diffusion.models.score_sde import ScoreSDE

__all__ = ["DDPM", "GenerativeModel", "ScoreSDE"]
