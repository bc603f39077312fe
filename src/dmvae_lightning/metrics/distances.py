"""Distances between two sample sets, for evaluation (fp64, no gradients).

Inputs are ``x`` (N, ...) and ``y`` (M, ...), flattened to (N, D) and (M, D) and cast to fp64 on
the CPU; every function returns a Python float. Unlike the training losses in
:mod:`dmvae_lightning.losses.matching` these are deterministic (fixed projections from ``seed``)
and accept sets of different sizes, so numbers from different runs are comparable.

* :func:`sliced_wasserstein`: ``SW_p = (mean_k W_p^p(x . theta_k, y . theta_k))^(1/p)`` over
  ``num_projections`` fixed unit directions; each 1-D ``W_p^p`` is exact between the two
  empirical measures (uniform weights ``1/N`` and ``1/M``), from their quantile functions.
* :func:`energy_distance`: ``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` with V-statistics (all pairs,
  the zero diagonal included), so a set has distance exactly 0 to itself and the value is >= 0.
  Squared-distance form: ``D^2``, in the units of the data (not its square).
* :func:`coverage`: share of ``y`` (the reference) with a point of ``x`` within ``radius``;
  :func:`precision` is the converse, share of ``x`` within ``radius`` of ``y``. Mode dropping
  shows as low coverage with high precision; collapse as low coverage; stray points as low
  precision.
* :func:`cloud_metrics`: all four in one dict.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "cloud_metrics",
    "coverage",
    "energy_distance",
    "precision",
    "sliced_wasserstein",
    "unit_directions",
]


def _as_rows(x: Tensor, name: str) -> Tensor:
    x = torch.as_tensor(x)
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"{name} must be (N, ...) with N > 0, got shape {tuple(x.shape)}")
    return x.detach().reshape(x.shape[0], -1).to("cpu", torch.float64)


def _pair(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    x, y = _as_rows(x, "x"), _as_rows(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x has {x.shape[1]} features per sample, y has {y.shape[1]}")
    return x, y


def unit_directions(dim: int, num: int, seed: int = 0) -> Tensor:
    """(dim, num) fp64 unit columns: normalised Gaussians from a generator seeded by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(dim, num, generator=gen, dtype=torch.float64)
    return theta / theta.norm(dim=0, keepdim=True)


def _wasserstein_1d(a: Tensor, b: Tensor, p: float) -> Tensor:
    """Exact ``W_p^p`` between the empirical measures of the rows of ``a`` (K, N) and ``b``
    (K, M), per row: the integral over s in (0, 1) of ``|F_a^-1(s) - F_b^-1(s)|^p``, both
    quantile functions being step functions with steps at ``i / N`` and ``j / M``."""
    a, b = a.sort(dim=1).values, b.sort(dim=1).values
    n, m = a.shape[1], b.shape[1]
    levels = torch.cat([torch.arange(1, n + 1) / n, torch.arange(1, m + 1) / m]).double()
    levels = levels.unique()  # sorted; the last one is 1
    widths = torch.diff(levels, prepend=levels.new_zeros(1))
    mid = levels - widths / 2
    ia = (mid * n).floor().long().clamp_max(n - 1)
    ib = (mid * m).floor().long().clamp_max(m - 1)
    gap = (a[:, ia] - b[:, ib]).abs()
    return (gap.square() if p == 2 else gap.pow(p)) @ widths


def sliced_wasserstein(
    x: Tensor,
    y: Tensor,
    num_projections: int = 256,
    p: float = 2.0,
    seed: int = 0,
    projections: Tensor | None = None,
) -> float:
    """``SW_p`` between ``x`` (N, ...) and ``y`` (M, ...) (see the module docstring).

    ``projections`` (D, K) overrides the ``num_projections`` seeded directions. For ``y = x + d``
    (a shift), ``SW_2^2 = mean_k (d . theta_k)^2`` exactly (``|d|^2 / D`` over uniform
    directions)."""
    x, y = _pair(x, y)
    if p < 1:
        raise ValueError(f"p must be >= 1, got {p}")
    if projections is None:
        if num_projections < 1:
            raise ValueError(f"num_projections must be >= 1, got {num_projections}")
        projections = unit_directions(x.shape[1], num_projections, seed)
    theta = torch.as_tensor(projections, dtype=torch.float64)
    if theta.ndim != 2 or theta.shape[0] != x.shape[1]:
        raise ValueError(f"projections must be ({x.shape[1]}, K), got {tuple(theta.shape)}")
    cost = _wasserstein_1d(theta.T @ x.T, theta.T @ y.T, p)  # (K,)
    return float(cost.mean() ** (1.0 / p))


def _mean_distance(a: Tensor, b: Tensor, chunk: int = 4096) -> Tensor:
    """Mean Euclidean distance over all (a_i, b_j) pairs, in row chunks of ``a``."""
    total = a.new_zeros(())
    for start in range(0, a.shape[0], chunk):
        total = total + torch.cdist(a[start : start + chunk], b).sum()
    return total / (a.shape[0] * b.shape[0])


def energy_distance(x: Tensor, y: Tensor) -> float:
    """``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` (V-statistics; see the module docstring).

    Two single points at distance d give 2d; ``energy_distance(x, x) == 0``."""
    x, y = _pair(x, y)
    value = 2 * _mean_distance(x, y) - _mean_distance(x, x) - _mean_distance(y, y)
    return float(value.clamp_min(0.0))


def _nearest(a: Tensor, b: Tensor, chunk: int = 4096) -> Tensor:
    """(len(a),) distance from each row of ``a`` to its nearest row of ``b``."""
    parts = [
        torch.cdist(a[start : start + chunk], b).min(dim=1).values
        for start in range(0, a.shape[0], chunk)
    ]
    return torch.cat(parts)


def coverage(x: Tensor, reference: Tensor, radius: float = 0.05) -> float:
    """Share of ``reference`` rows with a row of ``x`` within ``radius`` (Euclidean, <=)."""
    if radius <= 0:
        raise ValueError(f"radius must be > 0, got {radius}")
    x, reference = _pair(x, reference)
    return float((_nearest(reference, x) <= radius).double().mean())


def precision(x: Tensor, reference: Tensor, radius: float = 0.05) -> float:
    """Share of ``x`` rows with a row of ``reference`` within ``radius`` (Euclidean, <=)."""
    return coverage(reference, x, radius)


def cloud_metrics(
    x: Tensor,
    reference: Tensor,
    radius: float = 0.05,
    num_projections: int = 256,
    seed: int = 0,
) -> dict[str, float]:
    """``{"sw2", "energy", "coverage", "precision"}`` of ``x`` against ``reference``."""
    return {
        "sw2": sliced_wasserstein(x, reference, num_projections, 2.0, seed),
        "energy": energy_distance(x, reference),
        "coverage": coverage(x, reference, radius),
        "precision": precision(x, reference, radius),
    }
