"""Pure math, no Lightning: schedules, SDEs, samplers, likelihood estimators."""

from lightning_diffusion.diffusion.samplers import SAMPLERS, Denoiser, SamplerOutput, ancestral, sample
from lightning_diffusion.diffusion.schedules import NoiseSchedule, append_dims, make_betas

__all__ = ["SAMPLERS", "Denoiser", "NoiseSchedule", "SamplerOutput", "ancestral", "append_dims", "make_betas", "sample"]
