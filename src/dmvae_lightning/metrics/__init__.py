"""Evaluation metrics: Frechet distance of feature statistics (FID / rFID / gFID with
torch-fidelity's TF-Inception or the offline Fashion-MNIST domain network), Inception Score,
PSNR / SSIM / LPIPS, real-image statistics cached by content hash, ADM ``.npz`` files."""

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
    "evaluate_samples",
    "feature_stats",
    "frechet_distance",
    "inception_score",
    "load_adm_samples",
    "load_adm_stats",
    "reconstruction_metrics",
    "reference_stats",
    "save_adm_samples",
    "save_adm_stats",
]
