"""Pieces both LightningModules share: the warm-up schedule and EMA weights in evaluation."""

from __future__ import annotations

import contextlib

import torch


def linear_warmup(
    optimizer: torch.optim.Optimizer, steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning rate ramps linearly from ``lr / steps`` to ``lr`` over ``steps`` optimizer steps,
    then stays constant (``steps <= 0``: constant from the start)."""

    def factor(step: int) -> float:
        return 1.0 if steps <= 0 else min(1.0, (step + 1) / steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
