"""Data parallelism for modules that step several optimizers per batch: explicit gradient sync.

:class:`ExplicitDDPStrategy` (``trainer.strategy: ddp_explicit``) is Lightning's DDP without the
``DistributedDataParallel`` wrapper. After every backward it averages, across ranks, the gradients
of the parameters that require grad at that moment (:func:`all_reduce_gradients`: one flat
all-reduce per bucket of ``bucket_cap_mb``). Why not DDP:

* :class:`~dmvae_lightning.modules.dmvae.DMVAEModule` runs one backward per optimizer
  (generator, discriminator, DMD fake score model), each inside ``toggled_optimizer``, so each
  backward reaches one optimizer's parameters. A DDP wrapper owns *all* of them: with
  ``find_unused_parameters=False`` it waits for the rest and fails at the next batch ("Expected to
  have finished reduction in the prior iteration"); with ``True`` it searches every backward's
  graph and still all-reduces every bucket of the whole module (zeros for the unreached
  parameters), i.e. the tokenizer, discriminator and fake model for each of the 2-3 backwards.
  Here, the parameters that require grad are exactly the toggled optimizer's, so each backward
  sends only its own gradients; on the alignment batches where only the fake model steps (4 of
  5 with ``vae_every: 5``) that is the fake model alone (``benchmarks/bench_ddp.py``).
* No unused parameter can reach a reducer, because there is none. A parameter left without a
  gradient on some ranks gets zeros there (the average is over all ranks, as in DDP); one left
  without a gradient on every rank keeps ``grad = None`` (so AdamW skips it, as with DDP's
  ``find_unused_parameters=True``). Frozen networks (the DMD real model, a frozen encoder,
  ``requires_grad=False``) are never communicated.
* Buffers: rank 0's parameters and buffers are broadcast once, at setup (as DDP does). After that
  only the running statistics of normalisation layers (BatchNorm: ``running_mean``,
  ``running_var``, ``num_batches_tracked``) are broadcast from rank 0 after each training step
  (DDP's ``broadcast_buffers`` does it before each forward; after, ranks also agree at the
  end). Every other buffer (EMA averages, counters, latent statistics,
  fixed position embeddings, the frozen teacher's) is equal on all ranks by construction (same
  inputs, same arithmetic) and is never sent; DDP would broadcast all of them at every forward.

The cost: gradients are reduced after the backward instead of overlapping with it (DDP's
bucketed hooks). Gradient accumulation (``accumulate_grad_batches``) syncs only on the batch
that steps, like DDP's ``no_sync``.

The collectives :func:`all_reduce_gradients` and :func:`broadcast_tensors` work on any module in any
``torch.distributed`` job (e.g. a Fabric or plain PyTorch loop).
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.strategies import _StrategyRegistry
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

__all__ = [
    "ExplicitDDPStrategy",
    "all_reduce_gradients",
    "broadcast_tensors",
    "is_distributed",
    "norm_statistics",
]


def is_distributed(group: Any = None) -> bool:
    """Whether ``torch.distributed`` is initialised with more than one rank in ``group``."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _buckets(tensors: Sequence[Tensor], cap_bytes: int) -> Generator[list[Tensor], None, None]:
    """Consecutive runs of ``tensors`` of one dtype and device, each at most ``cap_bytes`` (a
    single larger tensor forms its own bucket)."""
    bucket: list[Tensor] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and (
            t.dtype != bucket[0].dtype or t.device != bucket[0].device or size + nbytes > cap_bytes
        ):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += nbytes
    if bucket:
        yield bucket


def _copy_back(flat: Tensor, tensors: Sequence[Tensor]) -> None:
    """Write consecutive slices of the 1-D ``flat`` into ``tensors``, in order."""
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def _all_reduce_mean(tensors: Sequence[Tensor], cap_bytes: int, group: Any) -> None:
    """In place: every tensor becomes its mean over the ranks (one flat all-reduce per bucket)."""
    world = dist.get_world_size(group)
    for bucket in _buckets(tensors, cap_bytes):
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        _copy_back(flat.div_(world), bucket)


def all_reduce_gradients(
    params: Iterable[nn.Parameter], bucket_cap_mb: float = 25.0, group: Any = None
) -> int:
    """Average the gradients of ``params`` over the ranks of ``group``, in place.

    Every rank must pass the same parameters in the same order. A parameter without a gradient
    on some ranks takes part with zeros there (its gradient becomes ``sum / world``, the
    average DDP computes); one without a gradient on every rank keeps ``grad = None``. One
    all-reduce of a (P,) flag vector decides which is which, then one all-reduce per bucket of at
    most ``bucket_cap_mb`` MiB of one dtype. Sparse gradients are refused.

    Returns the number of gradient elements all-reduced (0 when not distributed).
    """
    params = [p for p in params if p.requires_grad]
    if not params or not is_distributed(group):
        return 0
    for p in params:
        if p.grad is not None and p.grad.is_sparse:
            raise ValueError("all_reduce_gradients: sparse gradients are not supported")
    has_grad = torch.tensor(
        [p.grad is not None for p in params], dtype=torch.int32, device=params[0].device
    )
    dist.all_reduce(has_grad, op=dist.ReduceOp.MAX, group=group)
    grads = []
    for p, used in zip(params, has_grad.tolist(), strict=True):
        if not used:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    _all_reduce_mean(grads, int(bucket_cap_mb * 2**20), group)
    return sum(g.numel() for g in grads)


def norm_statistics(module: nn.Module) -> list[Tensor]:
    """The running-statistics buffers of every normalisation layer (BatchNorm and friends) of
    ``module`` that tracks them, in module order."""
    out: list[Tensor] = []
    for m in module.modules():
        if isinstance(m, _NormBase) and m.track_running_stats:
            out.extend(
                b for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None
            )
    return out


def broadcast_tensors(
    tensors: Sequence[Tensor],
    src: int = 0,
    group: Any = None,
    device: torch.device | None = None,
) -> None:
    """Copy global rank ``src``'s ``tensors`` (parameters, buffers, e.g. :func:`norm_statistics`)
    to every rank of ``group``, in place: one broadcast per 64 MiB bucket of one dtype, sent
    through ``device`` (default: the tensors' own; nccl needs a GPU)."""
    if not tensors or not is_distributed(group):
        return
    with torch.no_grad():
        for bucket in _buckets(tensors, 2**26):
            flat = torch.cat([t.detach().reshape(-1) for t in bucket])
            if device is not None:
                flat = flat.to(device)
            dist.broadcast(flat, src=src, group=group)
            _copy_back(flat, bucket)


class ExplicitDDPStrategy(DDPStrategy):
    """DDP without the wrapper: gradients of the parameters that require grad are averaged after
    each backward; see the module docstring for what is and is not communicated.

    Args:
        bucket_cap_mb: size of the flat all-reduce buffers (MiB).
        broadcast_norm_stats: broadcast rank 0's BatchNorm running statistics after each
            training step (DDP's ``broadcast_buffers``); False leaves them per rank.
        **kwargs: :class:`~lightning.pytorch.strategies.DDPStrategy` arguments
            (``start_method``, ``process_group_backend``, ``timeout``, ...). DDP-wrapper options
            (``find_unused_parameters``, ``static_graph``, ``ddp_comm_hook``, ...) do not apply
            and are refused.

    ``comm_stats`` counts, per fit, the backwards synced (``"backwards"``) and the gradient
    elements all-reduced (``"elements"``).
    """

    strategy_name = "ddp_explicit"
    _WRAPPER_OPTIONS = (
        "find_unused_parameters",
        "static_graph",
        "gradient_as_bucket_view",
        "broadcast_buffers",
    )

    def __init__(
        self, bucket_cap_mb: float = 25.0, broadcast_norm_stats: bool = True, **kwargs: Any
    ) -> None:
        for name in (
            "ddp_comm_state",
            "ddp_comm_hook",
            "ddp_comm_wrapper",
            "model_averaging_period",
        ):
            if kwargs.get(name) is not None:
                raise ValueError(f"ExplicitDDPStrategy has no DDP wrapper: `{name}` does not apply")
        wrapper = [k for k in kwargs if k in self._WRAPPER_OPTIONS]
        if wrapper:
            raise ValueError(
                f"ExplicitDDPStrategy has no DDP wrapper: {wrapper} do not apply (every backward "
                "syncs the gradients of the parameters that require grad)"
            )
        super().__init__(**kwargs)
        self.bucket_cap_mb = float(bucket_cap_mb)
        self.broadcast_norm_stats = bool(broadcast_norm_stats)
        self._sync_enabled = True
        self._norm_buffers: list[Tensor] = []
        self.comm_stats = {"backwards": 0, "elements": 0}

    def configure_ddp(self) -> None:
        """No wrapper: broadcast rank 0's parameters and buffers once and keep the module."""
        assert self.model is not None
        _sync_module_states(self.model)
        self._norm_buffers = norm_statistics(self.model) if self.broadcast_norm_stats else []
        self.comm_stats = {"backwards": 0, "elements": 0}

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        out = super().training_step(*args, **kwargs)
        # After the step (DDP broadcasts before each forward): the statistics used in training
        # are the batch's either way, and this way ranks also agree after the last step.
        broadcast_tensors(self._norm_buffers)
        return out

    def post_backward(self, closure_loss: Tensor) -> None:
        if not self._sync_enabled or self.lightning_module is None:
            return
        elements = all_reduce_gradients(self.lightning_module.parameters(), self.bucket_cap_mb)
        self.comm_stats["backwards"] += 1
        self.comm_stats["elements"] += elements

    @contextmanager
    def block_backward_sync(self) -> Generator[None, None, None]:
        """Gradient accumulation: backwards inside this block do not sync (the last one does)."""
        previous, self._sync_enabled = self._sync_enabled, False
        try:
            yield None
        finally:
            self._sync_enabled = previous

    @classmethod
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        """Register ``ddp_explicit`` / ``_spawn`` / ``_fork``; names already present are left
        alone (idempotent)."""
        for name, start_method in (
            ("ddp_explicit", "popen"),
            ("ddp_explicit_spawn", "spawn"),
            ("ddp_explicit_fork", "fork"),
        ):
            if name in strategy_registry:
                continue
            strategy_registry.register(
                name,
                cls,
                description=(
                    "DDP without the wrapper: explicit gradient all-reduce after every backward "
                    f"(start_method '{start_method}'), for modules with several optimizers"
                ),
                start_method=start_method,
            )
