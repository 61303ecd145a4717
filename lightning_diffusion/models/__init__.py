"""LightningModules of the model families: the thin base, one layer per kind of family, the families.

``GenerativeModel`` (base) <- ``GaussianDiffusionModel`` (gaussian_diffusion) <- ``DDPM``, ``ScoreSDE``;
``GenerativeModel`` <- ``LatentVariableModel`` (latent_variable) <- ``VAE``, ``HierarchicalVAE``, ``VQVAE``;
``GenerativeModel`` <- ``EBM`` (ebm);
``GenerativeModel`` <- ``DiscreteDiffusion`` (discrete_diffusion);
``GenerativeModel`` <- ``LatentDiffusion`` (latent_diffusion: a prior of any family over a frozen ``FirstStage``).
"""

from lightning_diffusion.models.base import GenerativeModel
from lightning_diffusion.models.compose import Composition, Term, compose, conditional_product
from lightning_diffusion.models.ddpm import DDPM
from lightning_diffusion.models.discrete_diffusion import DiscreteDiffusion
from lightning_diffusion.models.ebm import EBM
from lightning_diffusion.models.gaussian_diffusion import GaussianDiffusionModel
from lightning_diffusion.models.hvae import HierarchicalVAE
from lightning_diffusion.models.first_stage import FirstStage
from lightning_diffusion.models.latent_diffusion import LatentDiffusion
from lightning_diffusion.models.latent_variable import LatentVariableModel
from lightning_diffusion.models.score_sde import ScoreSDE
from lightning_diffusion.models.vae import VAE
from lightning_diffusion.models.vqvae import VQVAE

__all__ = ["Composition", "Term", "compose", "conditional_product",
           "DDPM", "DiscreteDiffusion", "EBM", "FirstStage", "GaussianDiffusionModel", "GenerativeModel", "HierarchicalVAE",
           "LatentDiffusion", "LatentVariableModel", "ScoreSDE", "VAE", "VQVAE"]
