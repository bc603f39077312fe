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
``DDPStrategy(broadcast_buffers=False)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = ["EMA"]


def _buffer_name(name: str) -> str:
    return name.replace(".", "__")


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

    Buffers: one per tracked tensor plus ``num_updates`` (int64 scalar), all persistent.
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

    def _pairs(self, model: nn.Module, names: list[str]) -> tuple[list[Tensor], list[Tensor]]:
        """(EMA buffers, model tensors) for ``names``; raises when the model does not match."""
        tensors = dict(model.named_parameters())
        tensors.update(model.named_buffers())
        missing = [n for n in names if n not in tensors]
        if missing:
            raise KeyError(
                f"model does not match the EMA: missing {missing[:5]} "
                f"({len(missing)} in all). Was the EMA built from another module?"
            )
        return [getattr(self, _buffer_name(n)) for n in names], [tensors[n] for n in names]

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

        The originals are restored exactly, also when the block raises. Yields ``model``.
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
                self._copy(tensors, backup)
