"""Pieces both LightningModules share: the warm-up schedule and EMA weights in evaluation."""

from __future__ import annotations

import contextlib
import contextvars
import pickle
from pathlib import Path
from typing import Any

import torch


def linear_warmup(
    optimizer: torch.optim.Optimizer, steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning rate ramps linearly from ``lr / steps`` to ``lr`` over ``steps`` optimizer steps,
    then stays constant (``steps <= 0``: constant from the start)."""

    def factor(step: int) -> float:
        return 1.0 if steps <= 0 else min(1.0, (step + 1) / steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


_LOAD_ERRORS = (RuntimeError, OSError, EOFError, pickle.UnpicklingError)


def unreadable(err: BaseException) -> bool:
    """Whether ``torch.load`` failed because the file is not a complete torch archive (truncated
    download, interrupted copy, another format) rather than because of its content."""
    return isinstance(err, (OSError, EOFError, pickle.UnpicklingError)) or (
        "PytorchStreamReader" in str(err) or "zip archive" in str(err)
    )


def torch_load(file: Path, option: str, **kwargs: Any) -> Any:
    """``torch.load(file, weights_only=True, **kwargs)``; a file that is not a complete torch
    archive is a ValueError naming ``option`` and the file."""
    try:
        return torch.load(file, weights_only=True, **kwargs)
    except _LOAD_ERRORS as err:
        if not unreadable(err):
            raise
        raise ValueError(
            f"{option}: {str(file)!r} is truncated or corrupt (torch.load: "
            f"{str(err).splitlines()[0][:100]})"
        ) from err


def load_checkpoint_module(cls: Any, file: Path, option: str, **kwargs: Any) -> Any:
    """``cls.load_from_checkpoint(file, map_location="cpu", weights_only=True, **kwargs)``, run in
    an empty context: LightningCLI builds the outer model inside a context variable that hands
    ITS arguments to every ``save_hyperparameters()`` call, so a module loaded while the CLI
    builds another would record the wrong hyperparameters. A file that does not load is a
    ValueError naming ``option``."""

    def build() -> Any:
        return cls.load_from_checkpoint(file, map_location="cpu", weights_only=True, **kwargs)

    try:
        return contextvars.Context().run(build)
    except _LOAD_ERRORS as err:
        if unreadable(err):
            raise ValueError(
                f"{option}: {str(file)!r} is truncated or corrupt (torch.load: "
                f"{str(err).splitlines()[0][:100]})"
            ) from err
        raise ValueError(
            f"{option}: {str(file)!r} is not a loadable {cls.__name__} checkpoint: {err}"
        ) from err
    except (KeyError, TypeError) as err:
        raise ValueError(
            f"{option}: {str(file)!r} is not a loadable {cls.__name__} checkpoint: {err}"
        ) from err


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
