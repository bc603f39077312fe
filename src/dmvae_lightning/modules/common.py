"""Pieces the LightningModules share: injected optimizers and schedulers with their defaults
(AdamW + linear warm-up), and EMA weights in evaluation."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn


def linear_warmup(
    optimizer: torch.optim.Optimizer, steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning rate ramps linearly from ``lr / steps`` to ``lr`` over ``steps`` optimizer steps,
    then stays constant (``steps <= 0``: constant from the start)."""

    def factor(step: int) -> float:
        return 1.0 if steps <= 0 else min(1.0, (step + 1) / steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def fused_supported(params: Iterable[torch.Tensor]) -> bool:
    """Whether the default AdamW runs fused: every parameter a plain (not sharded) CUDA
    tensor. Not on CPU: torch's CPU fused kernel rounds differently from the default one (about
    1e-8 after 20 steps), which would change the numbers of every CPU-scale config and test for
    no gain; not for FSDP2's DTensor shards."""
    params = list(params)
    if not params:
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        DTensor = ()  # noqa: N806
    return all(p.is_cuda and not isinstance(p, DTensor) for p in params)


def build_optimizer(
    factory: OptimizerCallable | None,
    params: Iterable[nn.Parameter],
    lr: float,
    betas: tuple[float, float] | list[float] = (0.9, 0.999),
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """``factory(params)`` when an optimizer is injected (``OptimizerCallable``, e.g.
    ``{class_path: torch.optim.SGD, init_args: {lr: 0.01}}`` in YAML), else the default:
    ``AdamW(params, lr, betas, weight_decay)``, fused where :func:`fused_supported`."""
    params = list(params)
    if factory is not None:
        return factory(params)
    extra = {"fused": True} if fused_supported(params) else {}  # on CPU: the call as before
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, **extra)


def build_scheduler(
    factory: LRSchedulerCallable | None, optimizer: torch.optim.Optimizer, warmup_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """``factory(optimizer)`` when a scheduler is injected, else :func:`linear_warmup` over
    ``warmup_steps``. Stepped once per optimizer step."""
    if factory is not None:
        return factory(optimizer)
    return linear_warmup(optimizer, warmup_steps)


def drop_callables_from_hparams(module: Any, names: Iterable[str]) -> None:
    """Remove arguments given as Python objects (an optimizer factory, a built loss) from the
    saved hyperparameters: they would not load with ``weights_only=True``. From a config
    (LightningCLI) they are saved as their ``class_path`` / ``init_args`` mapping and stay."""
    for name in names:
        value = module.hparams.get(name)
        if value is not None and not isinstance(value, (dict, str, int, float, bool, list)):
            module.hparams.pop(name)
            module._hparams_initial.pop(name, None)


class EMAInEvaluation:
    """Mixin for a LightningModule with an ``ema_scope()`` context manager: the EMA weights are
    swapped in at the start of every validation, test and predict epoch and the trained weights
    swapped back at its end. Subclasses that override one of these hooks call ``super()``."""

    _ema_stack: contextlib.ExitStack | None = None

    def _enter_ema(self) -> None:
        if self._ema_stack is None:
            self._ema_stack = contextlib.ExitStack()
            self._ema_stack.enter_context(self.ema_scope())

    def _exit_ema(self) -> None:
        if self._ema_stack is not None:
            self._ema_stack.close()
            self._ema_stack = None

    def on_validation_epoch_start(self) -> None:
        self._enter_ema()

    def on_validation_epoch_end(self) -> None:
        self._exit_ema()

    def on_test_epoch_start(self) -> None:
        self._enter_ema()

    def on_test_epoch_end(self) -> None:
        self._exit_ema()

    def on_predict_epoch_start(self) -> None:
        self._enter_ema()

    def on_predict_epoch_end(self) -> None:
        self._exit_ema()
