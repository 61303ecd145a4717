"""Pure math of discrete diffusion, no Lightning: categorical forward processes and posteriors in log space
(uniform / multinomial and absorbing / masked), the exact variational bound and the continuous-time masked
ELBO, importance sampling of t, and the ancestral and SUNDAE samplers."""

from lightning_diffusion.discrete.bound import (TimestepSampler, kl_term, masked_elbo, masked_elbo_exact, prior_kl,
                                                variational_bound, x0_cross_entropy)
from lightning_diffusion.discrete.processes import AbsorbingDiffusion, CategoricalProcess, UniformDiffusion
from lightning_diffusion.discrete.samplers import SamplerOutput, ancestral, sundae, time_grid, unroll

__all__ = ["AbsorbingDiffusion", "CategoricalProcess", "SamplerOutput", "TimestepSampler", "UniformDiffusion",
           "ancestral", "kl_term", "masked_elbo", "masked_elbo_exact", "prior_kl", "sundae", "time_grid", "unroll",
           "variational_bound", "x0_cross_entropy"]
