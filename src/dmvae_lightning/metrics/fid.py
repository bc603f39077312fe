"""Frechet distance between Gaussian fits of feature sets (FID when the features are Inception's;
"domain FID" with a feature network trained on the data set itself).

``FD = ||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))``, computed in float64. The matrix
square-root trace uses ``tr((S_1 S_2)^(1/2)) = sum_i sqrt(lambda_i)`` with ``lambda_i`` the
eigenvalues of the symmetric PSD matrix ``S_1^(1/2) S_2 S_1^(1/2)`` (same spectrum as
``S_1 S_2``), so no non-symmetric ``sqrtm`` and no complex parts to discard.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

__all__ = ["FeatureStats", "feature_stats", "frechet_distance"]  # + DomainFeatures (moved)


@dataclass(frozen=True)
class FeatureStats:
    """Mean (D,) and covariance (D, D), float64, of ``count`` feature vectors."""

    mu: torch.Tensor
    sigma: torch.Tensor
    count: int


def feature_stats(features: torch.Tensor | Iterable[torch.Tensor]) -> FeatureStats:
    """Gaussian fit of features (N, D) (or an iterable of (n_i, D) chunks), float64; the
    covariance is unbiased (divides by N - 1), as in the reference FID implementations."""
    if isinstance(features, torch.Tensor):
        features = [features]
    count, total, outer = 0, None, None
    for chunk in features:
        f = chunk.detach().reshape(chunk.shape[0], -1).double().cpu()
        total = f.sum(0) if total is None else total + f.sum(0)
        outer = f.T @ f if outer is None else outer + f.T @ f
        count += f.shape[0]
    if count < 2:
        raise ValueError(f"feature_stats needs at least 2 feature vectors, got {count}")
    mu = total / count
    sigma = (outer - count * torch.outer(mu, mu)) / (count - 1)
    return FeatureStats(mu, sigma, count)


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """Frechet distance between the Gaussian fits ``a`` and ``b`` (float64, >= 0 up to
    rounding)."""
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"feature dims differ: {tuple(a.mu.shape)} vs {tuple(b.mu.shape)}")
    root = _sqrt_psd(a.sigma.double())
    middle = root @ b.sigma.double() @ root
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    diff = a.mu.double() - b.mu.double()
    value = diff @ diff + torch.trace(a.sigma) + torch.trace(b.sigma) - 2 * trace_sqrt
    return float(value)
