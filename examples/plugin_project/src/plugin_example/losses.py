"""A matching loss of this project: per-channel moment matching, as a ``torchmetrics.Metric``.

``DMVAEModule`` calls any matching loss that is neither DMD nor Gaussian KL as
``loss(z, batch["reference"])`` on VAE steps and adds ``matching_weight`` times the returned
value to the generator loss; ``update`` / ``compute`` give a validation distance.
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric


class MomentMatchingLoss(Metric):
    """``|mean_c(z) - mean_c(ref)|^2 + |std_c(z) - std_c(ref)|^2`` averaged over channels ``c``
    (statistics over batch and positions of the (B, C, H, W) sets).

    Calling it returns the differentiable batch value. ``calls`` counts the calls and
    ``last_reference_mean`` is the mean of the last reference batch it saw (how the example's
    test checks that this loss, fed by the custom source, is what trained the tokenizer).
    """

    is_differentiable = True
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.calls = 0
        self.last_reference_mean: float | None = None

    @staticmethod
    def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        per_channel = x.float().transpose(0, 1).reshape(x.shape[1], -1)
        return per_channel.mean(dim=1), per_channel.std(dim=1)

    def loss(self, z: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Scalar fp32 moment distance between latents ``z`` and ``reference`` (B, C, H, W)."""
        mean_z, std_z = self._moments(z)
        mean_r, std_r = self._moments(reference)
        return ((mean_z - mean_r).square() + (std_z - std_r).square()).mean()

    def update(self, z: torch.Tensor, reference: torch.Tensor) -> None:
        self.calls += 1
        self.last_reference_mean = float(reference.detach().float().mean())
        self.total = self.total + self.loss(z, reference).double()
        self.count = self.count + 1

    def compute(self) -> torch.Tensor:
        return (self.total / self.count).float()

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        value = super().forward(*args, **kwargs)
        self._forward_cache = value.detach()  # do not hold the graph until the next call
        return value
