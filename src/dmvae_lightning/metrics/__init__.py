"""Evaluation metrics: Frechet distance of feature statistics (FID / rFID with any feature
network, e.g. the offline Fashion-MNIST domain network) and latent-vs-reference distances."""

from dmvae_lightning.metrics.fid import (
    DomainFeatures,
    FeatureStats,
    feature_stats,
    frechet_distance,
)

__all__ = ["DomainFeatures", "FeatureStats", "feature_stats", "frechet_distance"]
