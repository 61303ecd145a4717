"""Networks: the DDPM UNet for images, a residual MLP for low-dimensional points, and the VAE
encoders/decoders and ladder net, energy nets (``E(x) -> [B]``) for the EBM and the noise-conditional ``EnergyHead`` (``E(x, t, y) -> [B]``) of energy-parameterized diffusion, and categorical nets
(x0 logits over K categories) for discrete diffusion."""

from lightning_diffusion.nets.categorical import CategoricalUNet, SequenceTransformer
from lightning_diffusion.nets.embedding import timestep_embedding
from lightning_diffusion.nets.energy import EnergyConvNet, EnergyMLP, ScalarEnergy
from lightning_diffusion.nets.energy_head import EnergyHead
from lightning_diffusion.nets.mlp import MLP
from lightning_diffusion.nets.unet import UNet
from lightning_diffusion.nets.vae import ConvVAENet, ConvVQNet, LadderVAENet, MLPVAENet

__all__ = ["CategoricalUNet", "SequenceTransformer", "MLP", "EnergyConvNet", "EnergyMLP", "EnergyHead", "ScalarEnergy", "ConvVAENet", "ConvVQNet", "LadderVAENet", "MLPVAENet", "UNet", "timestep_embedding"]
