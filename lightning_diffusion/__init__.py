"""lightning_diffusion: VAEs, hierarchical VAEs, DDPMs and score SDEs for PyTorch Lightning."""

__version__ = "0.1.0"

from lightning_diffusion.callbacks import SampleGrid  # noqa: E402
from lightning_diffusion.data import ShardDataModule  # noqa: E402
from lightning_diffusion.models import DDPM, GenerativeModel  # noqa: E402
from lightning_diffusion.nets import MLP, UNet  # noqa: E402

__all__ = ["DDPM", "MLP", "GenerativeModel", "SampleGrid", "ShardDataModule", "UNet", "__version__"]
