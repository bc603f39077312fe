"""Frechet distance: closed forms for Gaussians with commuting covariances, and the unbiased
feature statistics."""

from __future__ import annotations

import pytest
import torch

from dmvae_lightning.metrics import FeatureStats, feature_stats, frechet_distance


def test_frechet_distance_matches_the_closed_form_for_diagonal_covariances():
    """For diagonal S1, S2: FD = |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2."""
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.randn(6, generator=g, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    s1 = torch.rand(6, generator=g, dtype=torch.float64) + 0.1
    s2 = torch.rand(6, generator=g, dtype=torch.float64) + 0.1
    a = FeatureStats(mu1, torch.diag(s1), 100)
    b = FeatureStats(mu2, torch.diag(s2), 100)
    expected = float((mu1 - mu2).square().sum() + (s1.sqrt() - s2.sqrt()).square().sum())
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-10)
    # a rotation of both covariances leaves the distance unchanged
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    ra = FeatureStats(q @ mu1, q @ torch.diag(s1) @ q.T, 100)
    rb = FeatureStats(q @ mu2, q @ torch.diag(s2) @ q.T, 100)
    assert frechet_distance(ra, rb) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-10)


def test_feature_stats_are_unbiased_and_chunk_independent():
    x = torch.randn(257, 5, generator=torch.Generator().manual_seed(1))
    whole = feature_stats(x)
    chunked = feature_stats(x.split(50))
    torch.testing.assert_close(whole.mu, x.double().mean(0))
    torch.testing.assert_close(whole.sigma, torch.cov(x.double().T))
    torch.testing.assert_close(chunked.sigma, whole.sigma)
    assert whole.count == chunked.count == 257
    with pytest.raises(ValueError, match="at least 2"):
        feature_stats(x[:1])
