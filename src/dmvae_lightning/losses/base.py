"""Shared pieces of the matching losses (:mod:`dmvae_lightning.losses.matching`,
:mod:`dmvae_lightning.losses.dmd`): the metric base class whose ``forward`` returns the
differentiable batch loss, cross-rank sample gathering with the local gradient kept, fp32
contexts and shape helpers. See :mod:`dmvae_lightning.losses.matching` for the conventions."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchmetrics import Metric

from dmvae_lightning.distributed import is_distributed

# 1 - t is clamped below at this value when "score_l2" turns velocities into scores (t -> 1).
SCORE_MIN_SIGMA = 1e-3


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the incoming gradient by ``scale``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


def gather_samples(x: Tensor, scale_grad: bool = True, group: Any = None) -> Tensor:
    """Concatenate the (B_r, ...) samples of every rank, in rank order, keeping the local graph.

    The other ranks' samples arrive through ``all_gather`` of detached tensors (ranks may hold
    different B_r: batches are padded to the largest and trimmed); the local slice is the live
    ``x``, so gradients reach this rank's samples only. ``scale_grad`` multiplies the gradient of
    the local slice by the world size (see the module docstring: with DDP's gradient averaging
    this gives the single-process gradient). Returns ``x`` unchanged when not distributed.
    """
    if not is_distributed(group):
        return x
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    size = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    counts = [int(s) for s in sizes]
    largest = max(counts)
    sent = x.detach().contiguous()
    if sent.shape[0] < largest:
        sent = torch.cat([sent, sent.new_zeros((largest - sent.shape[0], *sent.shape[1:]))])
    parts = [torch.empty_like(sent) for _ in range(world)]
    dist.all_gather(parts, sent, group=group)
    parts = [part[:count] for part, count in zip(parts, counts, strict=True)]
    parts[rank] = _ScaleGrad.apply(x, float(world)) if scale_grad else x
    return torch.cat(parts)


def _shared_seed(device: torch.device, sync: bool, group: Any = None) -> int:
    """A seed drawn from the global torch RNG; with ``sync`` rank 0's draw is broadcast."""
    seed = torch.randint(0, 2**62, (1,), dtype=torch.long)
    if sync and is_distributed(group):
        seed = seed.to(device)
        src = 0 if group is None else dist.get_global_rank(group, 0)
        dist.broadcast(seed, src=src, group=group)
    return int(seed.item())


@contextlib.contextmanager
def _fp32(device: torch.device) -> Iterator[None]:
    """Autocast off for the block (inputs are cast to fp32 by the callers)."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


@contextlib.contextmanager
def _no_param_grads(module: nn.Module) -> Iterator[None]:
    """Build graphs through ``module`` without edges to its parameters (grads still reach the
    inputs); the trainable flags are restored on exit."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _flat(x: Tensor) -> Tensor:
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"expected samples shaped (B, ...) with B > 0, got {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1).float()


def _sample_mean(x: Tensor) -> Tensor:
    """Mean over all non-batch dims, kept for broadcasting: (B, ...) -> (B, 1, ..., 1)."""
    return x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)


# ---------------------------------------------------------------------------------- base class
class _MatchingMetric(Metric):
    """Shared state: ``total`` (sum of weight * batch value) and ``weight``, fp64, summed over
    ranks; ``compute()`` returns ``total / weight`` as fp32. Subclasses implement ``loss(...)``
    and call :meth:`_accumulate` from ``update``."""

    is_differentiable = True
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("weight", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def _accumulate(self, value: Tensor, weight: float = 1.0) -> None:
        # Inside forward() this keeps the graph for the returned batch value; torchmetrics then
        # folds the batch state into the running state under no_grad (stored detached).
        self.total = self.total + value.double() * weight
        self.weight = self.weight + weight

    def compute(self) -> Tensor:
        return (self.total / self.weight).float()

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        value = super().forward(*args, **kwargs)
        self._forward_cache = value.detach()  # do not hold the graph between steps
        return value
