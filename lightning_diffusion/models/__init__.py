"""LightningModules of the model families."""

from lightning_diffusion.models.base import GenerativeModel
from lightning_diffusion.models.ddpm import DDPM
from lightning_diffusion.models.hvae import HierarchicalVAE
from lightning_diffusion.models.score_sde import ScoreSDE
from lightning_diffusion.models.vae import VAE

__all__ = ["DDPM", "GenerativeModel", "HierarchicalVAE", "ScoreSDE", "VAE"]
