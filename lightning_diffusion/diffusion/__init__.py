"""Pure math, no Lightning: schedules, SDEs, samplers, likelihood estimators."""

from lightning_diffusion.diffusion.samplers import SAMPLERS, ancestral
from lightning_diffusion.diffusion.schedules import NoiseSchedule, append_dims, make_betas

__all__ = ["SAMPLERS", "NoiseSchedule", "ancestral", "append_dims", "make_betas"]
