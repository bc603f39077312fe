"""Exponential moving average of one module's weights, kept as checkpointed buffers.

Use it for the networks that are trained and evaluated, i.e. the tokenizer or the DiT, and never
for a frozen teacher (its average equals itself: wasted memory) or a discriminator (nobody
evaluates an averaged discriminator)::

    self.ema = EMA(self.tokenizer, decay=0.9999)      # in the LightningModule's __init__
    self.ema.update(self.tokenizer)                   # after each optimiser step
    with self.ema.scope(self.tokenizer):              # validation / sampling with EMA weights
        ...

The averages are persistent buffers of the :class:`EMA` module, so they appear in the owner's
``state_dict`` under ``<attr>.<param name with '.' -> '__'>``, follow ``.to()`` and are restored
on resume. The tracked model is not stored (it would be saved twice); every method takes it as an
argument and checks that its parameter names match those seen at construction.

Under DDP with ``broadcast_buffers=True`` (the default) the EMA buffers are broadcast from rank 0
at every forward; they are identical on all ranks anyway, so for large models prefer
``DDPStrategy(broadcast_buffers=False)``. ``ddp_explicit``
(:class:`~dmvae_lightning.distributed.ExplicitDDPStrategy`) never broadcasts them.

Under FSDP2 (``fully_shard``, e.g. ``trainer.strategy: fsdp2``) the tracked parameters are
DTensor shards. After sharding the model, call :meth:`EMA.shard_like`: every average becomes a
DTensor with the same mesh and placements as its parameter, so each rank stores and updates only
the rows of its own shard. That costs ``1 / world_size`` of the full EMA per rank and no
communication per update (a local lerp of shard by shard, the same arithmetic as unsharded);
the averages are gathered only when a full state dict is taken (checkpoint saving) and
scattered when one is loaded, which Lightning's ``ModelParallelStrategy`` does for all DTensors
of the module. (The alternative, full EMA copies updated from ``param.full_tensor()``, would
hold the whole EMA on every rank and all-gather every parameter at every step.) Every method
first reshards the model's FSDP modules (``FSDPModule.reshard()``): a forward without backward
(evaluation) leaves the root module's gathered parameters registered in place of the shards, and
weights written into shards are only seen after the next gather.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = ["EMA"]


def _buffer_name(name: str) -> str:
    return name.replace(".", "__")


def _is_dtensor(tensor: Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _local(tensor: Tensor) -> Tensor:
    """The rank's shard of a DTensor (a view: writing it writes the DTensor), else ``tensor``."""
    return tensor.to_local() if _is_dtensor(tensor) else tensor


def _reshard(model: nn.Module) -> None:
    """Put the sharded parameters of every FSDP2 module of ``model`` back in place (a no-op for
    modules that are not sharded or already resharded)."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


class EMA(nn.Module):
    """EMA of a module's floating-point parameters; its buffers are copied as they are.

    After an update with decay ``d`` every averaged tensor becomes ``d * ema + (1 - d) * param``.
    With ``warmup=True`` the decay of the update that follows ``n`` earlier updates is
    ``min(decay, (1 + n) / (10 + n))`` (0.1 for the first one), so early averages are not
    dominated by the random initialisation. Non-floating parameters and all persistent buffers
    of the model (e.g. batch-norm statistics) are copied verbatim at each update.

    Args:
        model: the module to track; its current weights initialise the average.
        decay: EMA decay in [0, 1].
        warmup: use the warm-up decay schedule above.

    Buffers: one per tracked tensor plus ``num_updates`` (int64 scalar), all persistent. A
    buffer is a DTensor exactly when its model tensor is one (see :meth:`shard_like`).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = False) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}.")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self._averaged: list[str] = []  # model names of the floating-point parameters
        self._copied: list[str] = []  # model names of other parameters and persistent buffers
        seen: dict[str, str] = {}
        for name, tensor, averaged in self._model_tensors(model):
            key = _buffer_name(name)
            if key in seen or key == "num_updates":
                raise ValueError(
                    f"EMA buffer name {key!r} of {name!r} clashes with {seen.get(key, key)!r}."
                )
            seen[key] = name
            self.register_buffer(key, tensor.detach().clone())
            (self._averaged if averaged else self._copied).append(name)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @staticmethod
    def _model_tensors(model: nn.Module) -> Iterator[tuple[str, Tensor, bool]]:
        """(name, tensor, averaged?) for the parameters and persistent buffers of ``model``."""
        for name, param in model.named_parameters():
            yield name, param, param.is_floating_point()
        persistent = set(model.state_dict(keep_vars=True))
        for name, buf in model.named_buffers():
            if name in persistent:
                yield name, buf, False

    def _tensors(self, model: nn.Module, names: list[str]) -> list[Tensor]:
        """``model``'s tensors called ``names`` (FSDP modules resharded first); raises when the
        model does not match."""
        _reshard(model)
        tensors = dict(model.named_parameters())
        tensors.update(model.named_buffers())
        missing = [n for n in names if n not in tensors]
        if missing:
            raise KeyError(
                f"model does not match the EMA: missing {missing[:5]} "
                f"({len(missing)} in all). Was the EMA built from another module?"
            )
        return [tensors[n] for n in names]

    def _pairs(self, model: nn.Module, names: list[str]) -> tuple[list[Tensor], list[Tensor]]:
        """(EMA buffers, model tensors) for ``names`` as plain tensors (the local shards when
        sharded); raises when the model does not match or is sharded differently."""
        ema, tensors = [getattr(self, _buffer_name(n)) for n in names], self._tensors(model, names)
        for name, mine, theirs in zip(names, ema, tensors, strict=True):
            if _is_dtensor(mine) != _is_dtensor(theirs):
                kinds = [
                    "a DTensor" if _is_dtensor(t) else "a plain tensor" for t in (theirs, mine)
                ]
                raise RuntimeError(
                    f"the model's {name!r} is {kinds[0]} but its EMA buffer is {kinds[1]}; "
                    "after sharding the model (fully_shard) call EMA.shard_like(model)."
                )
            if _is_dtensor(mine) and (
                mine.device_mesh != theirs.device_mesh or mine.placements != theirs.placements
            ):
                raise RuntimeError(
                    f"the EMA buffer of {name!r} is sharded differently from the model's tensor "
                    f"({mine.placements} vs {theirs.placements}); call EMA.shard_like(model)."
                )
        return [_local(t) for t in ema], [_local(t) for t in tensors]

    @torch.no_grad()
    def shard_like(self, model: nn.Module) -> None:
        """Make every buffer whose model tensor is a DTensor (FSDP2 ``fully_shard``) a DTensor
        with the same device mesh and placements, keeping this rank's rows of the current
        average (no communication: every rank holds the full average before). Call it once
        after sharding the model and before the optimizer's first step; a no-op for buffers
        already sharded and for tensors that are not."""
        from torch.distributed.tensor import distribute_tensor

        names = self._averaged + self._copied
        for name, tensor in zip(names, self._tensors(model, names), strict=True):
            key = _buffer_name(name)
            buffer = getattr(self, key)
            if not _is_dtensor(tensor) or _is_dtensor(buffer):
                continue
            sharded = distribute_tensor(
                buffer.to(tensor.device),
                tensor.device_mesh,
                tensor.placements,
                src_data_rank=None,  # every rank cuts its own rows out of its full copy
            )
            if sharded.to_local().shape != tensor.to_local().shape:
                raise RuntimeError(
                    f"cannot shard the EMA of {name!r} like the model: local shard "
                    f"{tuple(sharded.to_local().shape)} vs {tuple(tensor.to_local().shape)}"
                )
            setattr(self, key, sharded)

    def current_decay(self) -> float:
        """Decay the next :meth:`update` will use."""
        if not self.warmup:
            return self.decay
        n = int(self.num_updates)
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the averages towards ``model``'s weights and copy its buffers."""
        decay = self.current_decay()
        ema, params = self._pairs(model, self._averaged)
        if ema:
            params = [p.to(e) for e, p in zip(ema, params, strict=True)]  # no-op if alike
            torch._foreach_lerp_(ema, params, 1.0 - decay)
        self._copy(*self._pairs(model, self._copied))
        self.num_updates += 1

    @staticmethod
    def _copy(dst: list[Tensor], src: list[Tensor]) -> None:
        if dst:
            torch._foreach_copy_(dst, src)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s tracked parameters and buffers with the EMA values."""
        for names in (self._averaged, self._copied):
            ema, tensors = self._pairs(model, names)
            self._copy(tensors, ema)

    @contextmanager
    def scope(self, model: nn.Module) -> Iterator[nn.Module]:
        """Run the block with the EMA weights in ``model``; restore the originals on exit.

        The originals are restored exactly, also when the block raises. Yields ``model``. With
        FSDP2 every rank must enter and leave the scope (the forwards inside gather weights).
        """
        names = self._averaged + self._copied
        with torch.no_grad():
            _, tensors = self._pairs(model, names)
            backup = [t.detach().clone() for t in tensors]
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                _, tensors = self._pairs(model, names)  # reshards: drops gathered EMA weights
                self._copy(tensors, backup)
