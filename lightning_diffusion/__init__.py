"""lightning_diffusion: VAEs, hierarchical VAEs, DDPMs and score SDEs for PyTorch Lightning.

The public names below are imported on first use (PEP 562), so that ``import lightning_diffusion``
and spawned DataLoader workers do not pay for Lightning until they need it.
"""

from importlib import import_module

__version__ = "0.1.0"

_PUBLIC = {
    "DDPM": "lightning_diffusion.models",
    "GenerativeModel": "lightning_diffusion.models",
    "ScoreSDE": "lightning_diffusion.models",
    "VAE": "lightning_diffusion.models",
    "HierarchicalVAE": "lightning_diffusion.models",
    "VPSDE": "lightning_diffusion.diffusion.sde",
    "SubVPSDE": "lightning_diffusion.diffusion.sde",
    "VESDE": "lightning_diffusion.diffusion.sde",
    "NoiseSchedule": "lightning_diffusion.diffusion.schedules",
    "GaussianMixture": "lightning_diffusion.diffusion.mixture",
    "ShardDataModule": "lightning_diffusion.data",
    "SampleGrid": "lightning_diffusion.callbacks",
    "EMA": "lightning_diffusion.callbacks",
    "SampleQuality": "lightning_diffusion.callbacks",
    "Likelihood": "lightning_diffusion.callbacks",
    "LastCheckpoint": "lightning_diffusion.callbacks",
    "WandbSamples": "lightning_diffusion.callbacks",
    "MLP": "lightning_diffusion.nets",
    "UNet": "lightning_diffusion.nets",
    "ConvVAENet": "lightning_diffusion.nets",
    "MLPVAENet": "lightning_diffusion.nets",
    "LadderVAENet": "lightning_diffusion.nets",
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
