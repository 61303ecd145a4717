"""Feature extractors and sample-quality metrics as ``torchmetrics.Metric``s (FID, KID, IS,
precision/recall; energy distance and MMD for points) and the bits/dim mean. Callbacks use these;
nothing here knows a model."""

from lightning_diffusion.metrics.features import EXTRACTORS, DigitsFeatures, FeatureExtractor, InceptionV3Features, get_extractor
from lightning_diffusion.metrics.quality import (FID, KID, MMD, BitsPerDim, EnergyDistance, InceptionScoreFromLogits,
                                                 PrecisionRecall, energy_distance, mmd)

__all__ = ["EXTRACTORS", "FID", "KID", "MMD", "BitsPerDim", "DigitsFeatures", "EnergyDistance", "FeatureExtractor",
           "InceptionScoreFromLogits", "InceptionV3Features", "PrecisionRecall", "energy_distance", "get_extractor",
           "mmd"]
