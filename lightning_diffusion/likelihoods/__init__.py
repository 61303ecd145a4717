"""Likelihood math that is not diffusion, shared by every family: pure math, no Lightning; of ours
it imports only itself and ``errors.py``.

- :mod:`.gaussian`: Gaussian densities and KL divergences (``normal_kl``, ``gaussian_log_likelihood``),
  the discretized Gaussian of 8-bit data (Ho et al. 2020, eq. 13), diagonal Gaussian latents
  (reparameterized samples, log-densities, ``soft_clamp`` of log-variances).
- :mod:`.decoders`: the decoder likelihoods ``p(x | z)`` of the latent-variable families
  (Bernoulli, Gaussian, discretized logistic, discretized mixture of logistics) and
  :class:`DecoderLikelihood`, which bundles one.
- :mod:`.bits`: nats to bits per dimension, the bin width and uniform dequantization of 8-bit data,
  and the log-mean-exp of importance weights (IWAE, AIS).

The VAE families, the EBM and the diffusion families (their decoder term and bits/dim) all use
these; none of them needs ``diffusion/`` for it.
"""

from lightning_diffusion.likelihoods.bits import (LN2, RunningLogMeanExp, bits_per_dim_discrete, dequantize, log_bin_width,
                                                  log_mean_exp, nats_to_bits_per_dim, sum_over_dims)
from lightning_diffusion.likelihoods.decoders import (LIKELIHOODS, MIN_LOG_SCALE, DecoderLikelihood, LikelihoodName,
                                                      bernoulli_log_prob, discretized_logistic_log_prob, dmol_log_prob,
                                                      dmol_mean, dmol_param_channels, dmol_sample)
from lightning_diffusion.likelihoods.gaussian import (diagonal_gaussian_log_prob, diagonal_gaussian_sample,
                                                      discretized_gaussian_log_likelihood, gaussian_log_likelihood,
                                                      normal_kl, soft_clamp)

__all__ = ["LIKELIHOODS", "LN2", "MIN_LOG_SCALE", "DecoderLikelihood", "LikelihoodName", "RunningLogMeanExp",
           "bernoulli_log_prob", "bits_per_dim_discrete", "dequantize", "diagonal_gaussian_log_prob",
           "diagonal_gaussian_sample", "discretized_gaussian_log_likelihood", "discretized_logistic_log_prob",
           "dmol_log_prob", "dmol_mean", "dmol_param_channels", "dmol_sample", "gaussian_log_likelihood",
           "log_bin_width", "log_mean_exp", "nats_to_bits_per_dim", "normal_kl", "soft_clamp", "sum_over_dims"]
