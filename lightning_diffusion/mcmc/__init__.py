"""Pure math, no Lightning: MCMC on an energy ``energy(x [B, ...]) -> E [B]`` (density ∝ exp(-E), E
in nats), for any data shape.

- Langevin moves (:mod:`.kernels`): `langevin` (ULA), `mala`, `hmc`, and the EBM codes' decoupled
  update `decoupled_langevin` (not a sampler of exp(-E): see its docstring); all return `MCMCResult`.
- Ladders (:mod:`.annealing`): `annealed_langevin` over noise levels (Song & Ermon 2019),
  `simulated_annealing` and `parallel_tempering` over temperatures; `geometric_ladder`.
- log Z (:mod:`.ais`): `ais` (a stochastic lower bound) and `reverse_ais` (BDMC's upper bound from
  exact samples) from a `GaussianBase` (`gaussian_base` fits one to data); and for 2-D energies
  (:mod:`.quadrature`) `grid_log_z` and `log_density_grid` by quadrature on a box.
- Diffusion recovery likelihood (:mod:`.recovery`, Gao et al. 2021): the noise ladder
  `recovery_ladder`, the pairs `recovery_pairs`, each level's conditional EBM `conditional_energy`,
  its short-run Langevin `recovery_langevin`, the walk down the ladder `recovery_sample` and the
  conditionals' log normalisers by AIS `recovery_log_normalizers`.
- Samples with their mode weights (:mod:`.smc`): `smc`, sequential Monte Carlo along AIS's path
  (resampling, adapted MALA/HMC moves), with log Z and its standard error from independent islands.

A model calls these with its energy net (``lambda x: net(x)``, or ``net(x, sigma)`` for
`annealed_langevin`) and its ``torch.Generator``.
"""

from lightning_diffusion.mcmc.ais import (AISResult, GaussianBase, ais, effective_sample_size, gaussian_base,
                                          log_mean_exp, reverse_ais, sigmoid_betas)
from lightning_diffusion.mcmc.annealing import (TemperingResult, annealed_langevin, geometric_ladder,
                                                parallel_tempering, simulated_annealing)
from lightning_diffusion.mcmc.kernels import (Energy, MCMCResult, decoupled_langevin, decoupled_temperature,
                                              energy_and_grad, hmc, langevin, mala)
from lightning_diffusion.mcmc.recovery import (PAPER_STEP_FACTOR, RecoveryLadder, RecoveryNormalizers, conditional_energy,
                                                recovery_ladder, recovery_langevin, recovery_log_normalizers,
                                                recovery_pairs, recovery_sample)
from lightning_diffusion.mcmc.smc import SMCResult, smc, systematic_resample
from lightning_diffusion.mcmc.quadrature import DensityGrid, box_around, grid_log_z, log_density_grid

__all__ = ["AISResult", "DensityGrid", "Energy", "GaussianBase", "MCMCResult", "TemperingResult", "ais",
           "annealed_langevin", "box_around", "decoupled_langevin", "decoupled_temperature", "effective_sample_size",
           "energy_and_grad", "gaussian_base", "geometric_ladder", "grid_log_z", "hmc", "langevin",
           "log_density_grid", "log_mean_exp", "mala", "parallel_tempering", "reverse_ais", "sigmoid_betas",
           "PAPER_STEP_FACTOR", "RecoveryLadder", "RecoveryNormalizers", "conditional_energy", "recovery_ladder",
           "recovery_langevin", "recovery_log_normalizers", "recovery_pairs", "recovery_sample",
           "simulated_annealing", "SMCResult", "smc", "systematic_resample"]
