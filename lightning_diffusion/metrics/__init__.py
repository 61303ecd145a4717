"""Feature extractors and sample-quality metrics (FID, KID, IS, precision/recall; energy
distance and MMD for points). Callbacks use these; nothing here knows a model."""

from lightning_diffusion.metrics.features import EXTRACTORS, DigitsFeatures, FeatureExtractor, InceptionV3Features, get_extractor
from lightning_diffusion.metrics.quality import (FeatureBank, GaussianStats, energy_distance, frechet_distance,
                                                 inception_score, kernel_distance, mmd, precision_recall)

__all__ = ["EXTRACTORS", "DigitsFeatures", "FeatureBank", "FeatureExtractor", "GaussianStats", "InceptionV3Features",
           "energy_distance", "frechet_distance", "get_extractor", "inception_score", "kernel_distance", "mmd",
           "precision_recall"]
