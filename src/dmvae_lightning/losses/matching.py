"""Matching losses between encoder latents and a reference distribution, as torchmetrics metrics.

Every loss is a :class:`torchmetrics.Metric` (``is_differentiable=True``,
``higher_is_better=False``, ``full_state_update=False``):

* calling it (``loss(...)``, i.e. ``forward``) returns the **differentiable batch loss**, a scalar
  fp32 tensor, and adds its detached value to the running state;
* ``update(...)`` / ``compute()`` accumulate a **validation value**: the weighted mean of the
  batch values seen since the last ``reset()`` (states ``total`` and ``weight``, fp64 sums,
  ``dist_reduce_fx="sum"``, so ``compute()`` is synced across ranks and must run on every rank).
  Distribution-level losses weigh each batch by 1 (mean of per-batch estimates); per-sample
  losses (Gaussian KL, pointwise alignment) weigh it by its batch size.

Losses (:class:`DMDLoss` lives in :mod:`dmvae_lightning.losses.dmd` and is re-exported here; the
shared base class and helpers in :mod:`dmvae_lightning.losses.base`):

* :class:`DMDLoss` - distribution-matching distillation (the DMVAE objective, PAPER.md section 2)
  with a frozen real-score and a trained fake-score flow-matching model, and the toy objectives
  the paper compares it with;
* :class:`MMDLoss` - maximum mean discrepancy (RBF / inverse multiquadric / KID polynomial
  kernels; unbiased U-statistic or linear-time estimator);
* :class:`SlicedWassersteinLoss` - ``SW_p^p`` over random 1-D projections;
* :class:`GaussianKLLoss` - the classic per-sample VAE KL to N(0, I);
* :class:`PointwiseAlignmentLoss` - VA-VAE-style marginal cosine and distance-matrix losses
  against frozen foundation-model features.

Distributed training: :class:`MMDLoss` and :class:`SlicedWassersteinLoss` estimate a distance
between *sets* of samples, so per-rank estimates would be noisier and biased differently from
the single-process loss on the global batch. They gather both sets across ranks
(:func:`gather_samples`: an ``all_gather`` of detached tensors whose local slice is then replaced
by the live tensor), so every rank computes the global-batch value and back-propagates into its
own samples only. By default the local gradient is multiplied by the world size W: DDP averages
parameter gradients over ranks, and ``(1 / W) * sum_r W * dL/dx_r * dx_r/dtheta = dL/dtheta``,
the gradient single-process training on the concatenated batch would get. Every rank must call
these losses the same number of times (they issue collectives), also in validation.

Time convention (as :mod:`dmvae_lightning.flow`): t = 1 is data, t = 0 is noise,
``z_t = t z + (1 - t) eps``, velocity target ``z - eps``, data prediction
``x_hat = z_t + (1 - t) v``, score ``(t v - z_t) / (1 - t)``. t, noise and path arithmetic are
fp32 under any autocast; only the score-network calls run under the caller's autocast. The
sample-set losses (MMD, SWD, KL, alignment) compute in fp32 with autocast disabled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmvae_lightning.losses.base import (
    SCORE_MIN_SIGMA,  # noqa: F401  (re-exported from its former home)
    _flat,
    _fp32,
    _MatchingMetric,
    _shared_seed,
    gather_samples,
)
from dmvae_lightning.losses.dmd import OBJECTIVES, DMDLoss, Objective  # noqa: F401  (re-exported)

__all__ = [
    "DMDLoss",
    "GaussianKLLoss",
    "MMDLoss",
    "PointwiseAlignmentLoss",
    "SlicedWassersteinLoss",
    "gather_samples",
]

Kernel = Literal["rbf", "imq", "poly"]
Estimator = Literal["unbiased", "linear"]
BandwidthUnit = Literal["sqrt_dim", "absolute"]


class MMDLoss(_MatchingMetric):
    """Squared maximum mean discrepancy ``MMD^2(P_x, P_y)`` between two sets of samples.

    Inputs ``x`` (B, ...) and ``y`` (M, ...), flattened to (B, D) and (M, D), fp32 (autocast
    off); with ``gather`` they are first gathered across ranks (:func:`gather_samples`).

    Kernels (``s_k`` = bandwidths, each times ``sqrt(D)`` when ``bandwidth_unit="sqrt_dim"``,
    so that for unit-variance coordinates ``||a - b||^2 / s_k^2`` stays O(1) whatever D):

    * ``"rbf"``: ``k(a, b) = mean_k exp(-||a - b||^2 / (2 s_k^2))``;
    * ``"imq"``: ``k(a, b) = mean_k (1 + ||a - b||^2 / s_k^2)^(-1/2)`` (inverse multiquadric,
      heavier tails than the RBF: gradients do not vanish for far-apart sets);
    * ``"poly"``: ``k(a, b) = (a.b / D + coef)^degree`` (KID's cubic kernel with the defaults;
      ``bandwidths`` unused).

    Estimators:

    * ``"unbiased"`` (U-statistic, O((B + M)^2 D)):
      ``sum_{i!=j} k(x_i, x_j) / (B(B-1)) + sum_{i!=j} k(y_i, y_j) / (M(M-1))
      - 2 sum_{i,j} k(x_i, y_j) / (BM)``; unbiased, so it can be slightly negative. B, M >= 2.
    * ``"linear"`` (Gretton et al. 2012, O(n D)): with ``n = min(B, M) // 2`` pairs,
      ``mean_i [k(x_{2i}, x_{2i+1}) + k(y_{2i}, y_{2i+1}) - k(x_{2i}, y_{2i+1})
      - k(x_{2i+1}, y_{2i})]``; unbiased with higher variance; samples beyond 2n are unused.

    Returns the MMD^2 estimate (scalar fp32); the validation value is its mean over batches.
    """

    def __init__(
        self,
        kernel: Kernel = "rbf",
        bandwidths: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0),
        bandwidth_unit: BandwidthUnit = "sqrt_dim",
        estimator: Estimator = "unbiased",
        degree: int = 3,
        coef: float = 1.0,
        gather: bool = True,
        scale_grad_by_world: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if kernel not in ("rbf", "imq", "poly"):
            raise ValueError(f"MMDLoss.kernel must be 'rbf', 'imq' or 'poly', got {kernel!r}")
        if estimator not in ("unbiased", "linear"):
            raise ValueError(f"MMDLoss.estimator must be 'unbiased' or 'linear', got {estimator!r}")
        if bandwidth_unit not in ("sqrt_dim", "absolute"):
            raise ValueError(
                f"MMDLoss.bandwidth_unit must be 'sqrt_dim' or 'absolute', got {bandwidth_unit!r}"
            )
        bandwidths = tuple(float(b) for b in bandwidths)
        if kernel != "poly" and (not bandwidths or min(bandwidths) <= 0):
            raise ValueError(f"MMDLoss.bandwidths must be non-empty and > 0, got {bandwidths}")
        if degree < 1:
            raise ValueError(f"MMDLoss.degree must be >= 1, got {degree}")
        self.kernel, self.estimator, self.bandwidth_unit = kernel, estimator, bandwidth_unit
        self.bandwidths, self.degree, self.coef = bandwidths, int(degree), float(coef)
        self.gather, self.scale_grad_by_world = gather, scale_grad_by_world

    def _inv_sq_bandwidths(self, dim: int) -> list[float]:
        unit = dim if self.bandwidth_unit == "sqrt_dim" else 1.0
        return [1.0 / (b * b * unit) for b in self.bandwidths]

    def _from_sq_dist(self, d2: Tensor, inv: list[float]) -> Tensor:
        """Kernel values from squared distances (any shape), averaged over bandwidths."""
        total: Tensor | None = None
        for c in inv:
            if self.kernel == "rbf":
                k = torch.exp(d2 * (-0.5 * c))
            else:
                k = torch.rsqrt(1.0 + d2 * c)
            total = k if total is None else total + k
        assert total is not None
        return total / len(inv)

    def _kernel_matrix(
        self, a: Tensor, b: Tensor, a_sq: Tensor, b_sq: Tensor, inv: list[float]
    ) -> Tensor:
        """(len(a), len(b)) kernel matrix; ``a_sq``, ``b_sq`` are the rows' squared norms."""
        dim = a.shape[1]
        if self.kernel == "poly":
            k = torch.addmm(a.new_tensor(self.coef), a, b.T, alpha=1.0 / dim)
            k = k.pow(self.degree)
        else:
            d2 = torch.addmm(a_sq[:, None] + b_sq[None, :], a, b.T, alpha=-2.0).clamp_min(0.0)
            k = self._from_sq_dist(d2, inv)
        return k

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        """MMD^2 estimate between ``x`` (B, ...) and ``y`` (M, ...) (gathered); scalar fp32."""
        x, y = _flat(x), _flat(y)
        if x.shape[1] != y.shape[1]:
            raise ValueError(f"x has {x.shape[1]} features per sample, y has {y.shape[1]}")
        if self.gather:
            group = self.process_group
            x = gather_samples(x, self.scale_grad_by_world, group)
            y = gather_samples(y, self.scale_grad_by_world, group)
        with _fp32(x.device):
            return self._linear(x, y) if self.estimator == "linear" else self._unbiased(x, y)

    def _unbiased(self, x: Tensor, y: Tensor) -> Tensor:
        m, n = x.shape[0], y.shape[0]
        if m < 2 or n < 2:
            raise ValueError(f"the unbiased MMD needs >= 2 samples per set, got {m} and {n}")
        inv = self._inv_sq_bandwidths(x.shape[1])
        x_sq, y_sq = x.square().sum(1), y.square().sum(1)
        k_xx = self._kernel_matrix(x, x, x_sq, x_sq, inv)
        k_yy = self._kernel_matrix(y, y, y_sq, y_sq, inv)
        k_xy = self._kernel_matrix(x, y, x_sq, y_sq, inv)
        xx = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
        yy = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
        return xx + yy - 2.0 * k_xy.mean()

    def _pair_kernel(self, a: Tensor, b: Tensor, inv: list[float]) -> Tensor:
        if self.kernel == "poly":
            return ((a * b).sum(1) / a.shape[1] + self.coef).pow(self.degree)
        return self._from_sq_dist((a - b).square().sum(1), inv)

    def _linear(self, x: Tensor, y: Tensor) -> Tensor:
        pairs = min(x.shape[0], y.shape[0]) // 2
        if pairs < 1:
            raise ValueError("the linear MMD needs >= 2 samples per set")
        inv = self._inv_sq_bandwidths(x.shape[1])
        x1, x2 = x[0 : 2 * pairs : 2], x[1 : 2 * pairs : 2]
        y1, y2 = y[0 : 2 * pairs : 2], y[1 : 2 * pairs : 2]
        h = (
            self._pair_kernel(x1, x2, inv)
            + self._pair_kernel(y1, y2, inv)
            - self._pair_kernel(x1, y2, inv)
            - self._pair_kernel(x2, y1, inv)
        )
        return h.mean()

    def update(self, x: Tensor, y: Tensor) -> None:
        """Add this batch's MMD^2 estimate to the running state (weight 1 per batch)."""
        self._accumulate(self.loss(x, y))


# ---------------------------------------------------------------------------------- SWD
class SlicedWassersteinLoss(_MatchingMetric):
    """Sliced Wasserstein distance to the power p, ``SW_p^p(P_x, P_y)``, between equal-size sets.

    ``x`` and ``y`` (N, ...) are flattened to (N, D) (fp32, autocast off) and, with ``gather``,
    gathered across ranks; the two sets must then hold the same number of samples N (each is an
    empirical measure with weights 1/N, for which sorting gives the exact 1-D optimal transport).
    With ``num_projections`` = P directions ``theta_k`` drawn uniformly on the unit sphere,

        SW_p^p = (1 / P) sum_k (1 / N) sum_i |sort(x theta_k)_i - sort(y theta_k)_i|^p

    i.e. the mean over directions of the exact ``W_p^p`` between the projected samples. The
    value is the p-th power (not its p-th root) everywhere, also in ``compute()``: it is an
    unbiased Monte-Carlo estimate over directions and smooth at 0 for p = 2. For
    N(0, I) vs N(m, I) in D dimensions ``SW_2^2 -> |m|^2 / D``.

    Directions are redrawn at every call from a seed taken from the global torch RNG (rank 0's
    seed is broadcast when gathering, so all ranks project identically); ``projections``
    (D, P) passes fixed ones. Returns a scalar fp32; the validation value is the mean over
    batches.
    """

    def __init__(
        self,
        num_projections: int = 128,
        p: float = 2.0,
        gather: bool = True,
        scale_grad_by_world: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if num_projections < 1:
            raise ValueError(
                f"SlicedWassersteinLoss.num_projections must be >= 1, got {num_projections}"
            )
        if p < 1:
            raise ValueError(f"SlicedWassersteinLoss.p must be >= 1, got {p}")
        self.num_projections, self.p = int(num_projections), float(p)
        self.gather, self.scale_grad_by_world = gather, scale_grad_by_world

    def projections(self, dim: int, device: torch.device) -> Tensor:
        """(dim, num_projections) fp32 unit columns from a (rank-0-shared) global-RNG seed."""
        seed = _shared_seed(device, self.gather, self.process_group)
        gen = torch.Generator(device=device).manual_seed(seed)
        theta = torch.randn(dim, self.num_projections, generator=gen, device=device)
        return theta / theta.norm(dim=0, keepdim=True)

    def loss(self, x: Tensor, y: Tensor, projections: Tensor | None = None) -> Tensor:
        """``SW_p^p`` between ``x`` and ``y`` (gathered); scalar fp32."""
        x, y = _flat(x), _flat(y)
        if x.shape[1] != y.shape[1]:
            raise ValueError(f"x has {x.shape[1]} features per sample, y has {y.shape[1]}")
        if self.gather:
            x = gather_samples(x, self.scale_grad_by_world, self.process_group)
            y = gather_samples(y, self.scale_grad_by_world, self.process_group)
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                "SlicedWassersteinLoss needs equal sample counts (after gathering), got "
                f"{x.shape[0]} and {y.shape[0]}"
            )
        if projections is None:
            projections = self.projections(x.shape[1], x.device)
        elif projections.shape[0] != x.shape[1]:
            raise ValueError(
                f"projections must be ({x.shape[1]}, P), got {tuple(projections.shape)}"
            )
        with _fp32(x.device):
            theta = projections.float()
            px = torch.sort(theta.T @ x.T, dim=1).values  # (P, N), sorted per direction
            py = torch.sort(theta.T @ y.T, dim=1).values
            diff = px - py
            if self.p == 2.0:
                return diff.square().mean()
            return diff.abs().pow(self.p).mean()

    def update(self, x: Tensor, y: Tensor, projections: Tensor | None = None) -> None:
        """Add this batch's ``SW_p^p`` to the running state (weight 1 per batch)."""
        self._accumulate(self.loss(x, y, projections))


# ---------------------------------------------------------------------------------- per sample
class GaussianKLLoss(_MatchingMetric):
    """Per-sample KL of a diagonal Gaussian posterior to N(0, I), the classic VAE term.

    ``forward(mean, logvar)`` with both (B, C, H, W) (any (B, ...)):
    ``KL_b = 0.5 * sum_{C,H,W} (mean^2 + exp(logvar) - 1 - logvar)``; returns ``mean_b KL_b``
    (scalar fp32, autocast off). The validation value is the mean of ``KL_b`` over all samples.
    """

    def loss(self, mean: Tensor, logvar: Tensor) -> Tensor:
        if mean.shape != logvar.shape:
            raise ValueError(f"mean {tuple(mean.shape)} and logvar {tuple(logvar.shape)} differ")
        with _fp32(mean.device):
            mean, logvar = _flat(mean), _flat(logvar)
            kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).sum(1)
            return kl.mean()

    def update(self, mean: Tensor, logvar: Tensor) -> None:
        self._accumulate(self.loss(mean, logvar), float(mean.shape[0]))


class PointwiseAlignmentLoss(_MatchingMetric):
    """VA-VAE-style alignment of latents with frozen foundation-model features, per position.

    ``forward(z, features)``: latents ``z`` (B, C, h, w) are mapped by ``proj`` (a per-position
    linear map C -> D, trainable: DMVAEModule trains it with the VAE; elsewhere give its
    parameters to your optimizer) when set, else C must equal D; ``features`` (B, D, h, w) are
    detached (frozen). With z'_i, f_i the D-vectors at
    position i of one image (N = h*w positions) and cos the cosine similarity:

    * marginal cosine loss ``mean_{b,i} relu(1 - margin_cos - cos(z'_i, f_i))``: a position
      whose latent already has cosine >= ``1 - margin_cos`` with its feature costs nothing;
    * marginal distance-matrix loss
      ``mean_{b,i,j} relu(|cos(z'_i, z'_j) - cos(f_i, f_j)| - margin_dist)``: the latents'
      self-similarity matrix should reproduce the features' one; differences up to
      ``margin_dist`` are tolerated.

    Returns ``weight_cos * cos_loss + weight_dist * dist_loss`` (scalar fp32, autocast off); the
    validation value is its mean over samples.

    Args:
        margin_cos, margin_dist: the margins m1, m2 above (VA-VAE: 0.5 and 0.25).
        proj: ``(latent_channels, feature_channels)`` of the projection, or None.
        weight_cos, weight_dist: weights of the two terms.
    """

    def __init__(
        self,
        margin_cos: float = 0.5,
        margin_dist: float = 0.25,
        proj: Sequence[int] | None = None,
        weight_cos: float = 1.0,
        weight_dist: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= margin_cos <= 2.0 or not 0.0 <= margin_dist <= 2.0:
            raise ValueError(
                "PointwiseAlignmentLoss.margin_cos and margin_dist must be in [0, 2], got "
                f"{margin_cos}, {margin_dist}"
            )
        self.margin_cos, self.margin_dist = float(margin_cos), float(margin_dist)
        self.weight_cos, self.weight_dist = float(weight_cos), float(weight_dist)
        if proj is not None:
            if len(proj) != 2 or min(proj) < 1:
                raise ValueError(
                    "PointwiseAlignmentLoss.proj must be [latent_channels, feature_channels], "
                    f"got {proj}"
                )
            self.proj: nn.Linear | None = nn.Linear(int(proj[0]), int(proj[1]))
        else:
            self.proj = None

    def loss(self, z: Tensor, features: Tensor) -> Tensor:
        if z.ndim != 4 or features.ndim != 4:
            raise ValueError(
                f"expected z (B, C, h, w) and features (B, D, h, w), got {tuple(z.shape)} "
                f"and {tuple(features.shape)}"
            )
        with _fp32(z.device):
            tokens = z.float().flatten(2).transpose(1, 2)  # (B, N, C)
            if self.proj is not None:
                tokens = F.linear(tokens, self.proj.weight.float(), self.proj.bias.float())
            feats = features.detach().float().flatten(2).transpose(1, 2)  # (B, N, D)
            if tokens.shape != feats.shape:
                raise ValueError(
                    f"latents give tokens {tuple(tokens.shape)} but features {tuple(feats.shape)}"
                    " (B, h*w, D); set PointwiseAlignmentLoss.proj or match the grids"
                )
            zn, fn = F.normalize(tokens, dim=-1), F.normalize(feats, dim=-1)
            cos = (zn * fn).sum(-1)
            cos_loss = F.relu(1.0 - self.margin_cos - cos).mean()
            gap = (zn @ zn.transpose(1, 2) - fn @ fn.transpose(1, 2)).abs()
            dist_loss = F.relu(gap - self.margin_dist).mean()
            return self.weight_cos * cos_loss + self.weight_dist * dist_loss

    def update(self, z: Tensor, features: Tensor) -> None:
        self._accumulate(self.loss(z, features), float(z.shape[0]))
