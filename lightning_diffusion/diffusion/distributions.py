"""Moved: the decoder likelihoods and latent-variable helpers are in :mod:`lightning_diffusion.likelihoods`
(likelihood math that is not diffusion). This module keeps the old import path working; new code
imports from ``lightning_diffusion.likelihoods``."""

from lightning_diffusion.likelihoods.bits import RunningLogMeanExp, log_bin_width, log_mean_exp  # noqa: F401
from lightning_diffusion.likelihoods.decoders import (LIKELIHOODS, MIN_LOG_SCALE, DecoderLikelihood,  # noqa: F401
                                                      LikelihoodName, _split_dmol, bernoulli_log_prob,
                                                      discretized_logistic_log_prob, dmol_log_prob, dmol_mean,
                                                      dmol_param_channels, dmol_sample)
from lightning_diffusion.likelihoods.gaussian import (diagonal_gaussian_log_prob, diagonal_gaussian_sample,  # noqa: F401
                                                      soft_clamp)
