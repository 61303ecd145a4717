"""Networks: the DDPM UNet for images, a residual MLP for low-dimensional points, and the VAE
encoders/decoders and ladder net, and energy nets (``E(x) -> [B]``) for the EBM."""

from lightning_diffusion.nets.embedding import timestep_embedding
from lightning_diffusion.nets.energy import EnergyConvNet, EnergyMLP, ScalarEnergy
from lightning_diffusion.nets.mlp import MLP
from lightning_diffusion.nets.unet import UNet
from lightning_diffusion.nets.vae import ConvVAENet, LadderVAENet, MLPVAENet

__all__ = ["MLP", "EnergyConvNet", "EnergyMLP", "ScalarEnergy", "ConvVAENet", "LadderVAENet", "MLPVAENet", "UNet", "timestep_embedding"]
