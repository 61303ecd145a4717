"""Denoising networks: the DDPM UNet for images and a residual MLP for low-dimensional points."""

from lightning_diffusion.nets.embedding import timestep_embedding
from lightning_diffusion.nets.mlp import MLP
from lightning_diffusion.nets.unet import UNet

__all__ = ["MLP", "UNet", "timestep_embedding"]
