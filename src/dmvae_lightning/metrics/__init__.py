"""Evaluation metrics: Frechet distance of feature statistics (FID / rFID / gFID with
torch-fidelity's TF-Inception or the offline Fashion-MNIST domain network), Inception Score,
PSNR / SSIM / LPIPS, real-image statistics cached by content hash, ADM ``.npz`` files, and
distances between small sample sets (:mod:`.distances`: sliced Wasserstein, energy distance,
coverage, precision)."""

from dmvae_lightning.metrics.distances import (
    cloud_metrics,
    coverage,
    energy_distance,
    precision,
    sliced_wasserstein,
)
from dmvae_lightning.metrics.evaluate import (
    evaluate_samples,
    inception_score,
    reconstruction_metrics,
)
from dmvae_lightning.metrics.extractors import (
    DomainFeatures,
    FeatureExtractor,
    FidelityFeatures,
    InceptionFeatures,
    build_extractor,
)
from dmvae_lightning.metrics.fid import FeatureStats, feature_stats, frechet_distance
from dmvae_lightning.metrics.stats import (
    StatsCache,
    load_adm_samples,
    load_adm_stats,
    reference_stats,
    save_adm_samples,
    save_adm_stats,
)

__all__ = [
    "DomainFeatures",
    "FeatureExtractor",
    "FeatureStats",
    "FidelityFeatures",
    "InceptionFeatures",
    "StatsCache",
    "build_extractor",
    "cloud_metrics",
    "coverage",
    "energy_distance",
    "evaluate_samples",
    "feature_stats",
    "frechet_distance",
    "inception_score",
    "load_adm_samples",
    "load_adm_stats",
    "precision",
    "reconstruction_metrics",
    "reference_stats",
    "save_adm_samples",
    "save_adm_stats",
    "sliced_wasserstein",
]
