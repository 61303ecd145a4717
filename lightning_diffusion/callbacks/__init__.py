"""Callbacks that use only the model contract (sample / bits_per_dim)."""

from lightning_diffusion.callbacks.checkpoint import LastCheckpoint
from lightning_diffusion.callbacks.ema import EMA, evaluation_weights, load_ema_weights
from lightning_diffusion.callbacks.quality import Likelihood, SampleQuality
from lightning_diffusion.callbacks.requeue import SlurmRequeue
from lightning_diffusion.callbacks.samples import SampleGrid
from lightning_diffusion.callbacks.signals import FitStopped, StopOnSignal
from lightning_diffusion.callbacks.wandb import WandbSamples

__all__ = ["EMA", "LastCheckpoint", "Likelihood", "SampleGrid", "SampleQuality", "SlurmRequeue", "StopOnSignal", "FitStopped", "WandbSamples", "evaluation_weights", "load_ema_weights"]
