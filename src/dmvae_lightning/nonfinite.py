"""Non-finite guard: a NaN / inf loss or gradient never reaches the weights or a checkpoint.

Each training module owns a :class:`NonFiniteGuard` (``model.init_args.nonfinite``, a
:class:`NonFiniteSpec`) and asks it before every optimizer step:

* ``mode: stop`` (default): the run stops with a :class:`NonFiniteError` naming the batch (the
  module's ``batch_count``), the optimizer step (generator, discriminator, fake score model, DiT),
  the loss terms or gradients that went non-finite and the last checkpoint written;
* ``mode: skip``: the optimizer step is skipped (weights, optimizer state and BatchNorm running
  statistics stay as they were), counted (``train/nonfinite_skips`` in the logs, saved in the
  checkpoint), and the run stops as above once more than ``max_skips`` steps were skipped;
* ``mode: off``: no checks.

Whatever the mode, a checkpoint whose state dict holds a non-finite floating tensor is refused
before anything is written (:meth:`NonFiniteGuard.check_state_dict`, called from the modules'
``on_save_checkpoint``), so ModelCheckpoint, the SLURM requeue and ``trainer.save_checkpoint``
never replace a good file by a broken one.

Under a fp16 ``GradScaler`` (``precision: 16-mixed``) infinite gradients are the scaler's normal
business (it skips those steps itself): only the loss is checked then.

Cost: one fused gradient-norm reduction and one device sync per optimizer step (plus, with
several ranks, one all-reduce of a flag, so that every rank skips or stops together; sharded
FSDP2 gradients are checked shard by shard).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypedDict

import torch
from torch import nn


class NonFiniteSpec(TypedDict, total=False):
    """``mode``: ``"stop"`` (default), ``"skip"`` or ``"off"``; ``max_skips``: skipped steps
    allowed in skip mode before the run stops (default 10, counted over the whole run)."""

    mode: Literal["stop", "skip", "off"]
    max_skips: int


class NonFiniteError(RuntimeError):
    """A training run met a non-finite loss, gradient or weight and stopped."""


def _is_finite(value: Any) -> bool:
    if hasattr(value, "to_local"):  # a DTensor shard (FSDP2): each rank checks its own part
        value = value.to_local()
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value).all()) if value.is_floating_point() else True
    if isinstance(value, float):
        return value == value and abs(value) != float("inf")
    return True


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # a DTensor's own shard (FSDP2)


def _distributed() -> bool:
    from dmvae_lightning.distributed import is_distributed

    return is_distributed()


def last_checkpoint(trainer: Any) -> str | None:
    """The most recently written checkpoint file known to the trainer's ModelCheckpoint
    callbacks (last, best or top-k), or None."""
    paths = []
    for cb in getattr(trainer, "checkpoint_callbacks", None) or []:
        for attr in ("last_model_path", "best_model_path", "_last_checkpoint_saved"):
            value = getattr(cb, attr, "")
            if value and Path(value).is_file():
                paths.append(Path(value))
    if not paths:
        return None
    return str(max(paths, key=lambda p: p.stat().st_mtime_ns))


def _uses_grad_scaler(trainer: Any) -> bool:
    plugin = getattr(trainer, "precision_plugin", None)
    return getattr(plugin, "scaler", None) is not None


class NonFiniteGuard:
    """The checks behind ``model.init_args.nonfinite`` (see the module docstring).

    Args:
        mode: ``"stop"``, ``"skip"`` or ``"off"``.
        max_skips: in skip mode, the run stops when more steps than this were skipped.
        option: the config option, for messages.
    """

    def __init__(
        self,
        mode: str = "stop",
        max_skips: int = 10,
        option: str = "model.init_args.nonfinite",
    ) -> None:
        if mode not in ("stop", "skip", "off"):
            raise ValueError(f"{option}.mode must be 'stop', 'skip' or 'off', got {mode!r}")
        if int(max_skips) < 0:
            raise ValueError(f"{option}.max_skips must be >= 0, got {max_skips}")
        self.mode = mode
        self.max_skips = int(max_skips)
        self.option = option
        self.skips = 0

    @classmethod
    def from_spec(
        cls, spec: Mapping[str, Any] | None, option: str = "model.init_args.nonfinite"
    ) -> NonFiniteGuard:
        spec = dict(spec or {})
        unknown = set(spec) - {"mode", "max_skips"}
        if unknown:
            raise ValueError(f"{option}: unknown keys {sorted(unknown)}; use mode, max_skips")
        return cls(spec.get("mode", "stop"), spec.get("max_skips", 10), option)

    @property
    def active(self) -> bool:
        return self.mode != "off"

    def _where(self, trainer: Any) -> str:
        path = last_checkpoint(trainer)
        return (
            f"last good checkpoint: {path}"
            if path
            else "no checkpoint was written before this step"
        )

    def check_step(
        self,
        module: nn.Module,
        batch: int,
        what: str,
        loss: torch.Tensor | None,
        logs: Mapping[str, Any] | None = None,
        params: Iterable[nn.Parameter] | None = None,
    ) -> bool:
        """Before the ``what`` optimizer step of batch ``batch``: True when ``loss``, the
        logged loss terms ``logs`` and the gradients of ``params`` are all finite (step), False
        in skip mode when one is not (skip: the caller must not step), NonFiniteError in stop
        mode or past ``max_skips``."""
        if not self.active:
            return True
        trainer = getattr(module, "_trainer", None)
        terms = {k: v for k, v in (logs or {}).items() if isinstance(v, (torch.Tensor, float))}
        if loss is not None:
            terms.setdefault("loss", loss.detach())
        params = [p for p in (params or []) if p.grad is not None]
        if _uses_grad_scaler(trainer):
            params = []  # inf gradients are the GradScaler's business
        device = loss.device if loss is not None else params[0].device if params else "cpu"
        # every check in one vector, read back with one device sync
        flags = [
            torch.isfinite(torch.as_tensor(_local(v), device=device)).all() for v in terms.values()
        ]
        if params:
            norms = torch._foreach_norm([_local(p.grad) for p in params], float("inf"))
            flags += [torch.isfinite(n).to(device) for n in norms]
        if not flags:
            return True
        ok = torch.stack(flags)
        bad_any = (~ok).any().float().reshape(1)
        if _distributed():  # one decision on every rank: a skip or stop on one rank only hangs
            torch.distributed.all_reduce(bad_any, op=torch.distributed.ReduceOp.MAX)
        values = torch.cat([ok.float(), bad_any]).tolist()
        if not values[-1]:
            return True
        names = list(terms)
        bad_terms = [k for k, good in zip(names, values, strict=False) if not good]
        if len(bad_terms) > 1 and "loss" in bad_terms:
            bad_terms.remove("loss")  # the logged terms say more
        grad_ok = values[len(names) : -1]
        bad_grads: list[str] = []
        if not bad_terms and params:
            param_names = {id(p): n for n, p in module.named_parameters()}
            bad_grads = [
                param_names.get(id(p), "?")
                for p, good in zip(params, grad_ok, strict=True)
                if not good
            ]
        if bad_terms:
            problem = "non-finite loss term(s) " + ", ".join(bad_terms)
        elif not bad_grads:
            problem = "a non-finite loss or gradient on another rank"
        else:
            shown = ", ".join(bad_grads[:3]) + (" ..." if len(bad_grads) > 3 else "")
            problem = f"non-finite gradients in {len(bad_grads)} parameter(s) ({shown})"
        if self.mode == "skip":
            self.skips += 1
            if self.skips <= self.max_skips:
                return False
            raise NonFiniteError(
                f"batch {batch}, {what} step: {problem}; skipped {self.skips} steps, more than "
                f"{self.option}.max_skips={self.max_skips}. Stopped; {self._where(trainer)}."
            )
        raise NonFiniteError(
            f"batch {batch}, {what} step: {problem}. Stopped before the optimizer step; "
            f"{self._where(trainer)}. Lower the learning rate, set grad_clip, or set "
            f"{self.option}.mode: skip."
        )

    def check_checkpoint(self, checkpoint: Mapping[str, Any], trainer: Any = None) -> None:
        """Raise NonFiniteError when a floating tensor of the checkpoint's ``state_dict`` or
        optimizer states holds NaN / inf. Called from the modules' ``on_save_checkpoint``, i.e.
        before the file is opened: the file (and the one it would replace) is never touched.
        Runs in every mode."""
        tensors = dict(checkpoint.get("state_dict") or {})
        for i, opt in enumerate(checkpoint.get("optimizer_states") or []):
            for key, state in (opt.get("state") or {}).items():
                for name, value in state.items():
                    tensors[f"optimizer_states[{i}].state[{key}].{name}"] = value
        bad = [k for k, v in tensors.items() if isinstance(v, torch.Tensor) and not _is_finite(v)]
        if bad:
            shown = ", ".join(bad[:3]) + (" ..." if len(bad) > 3 else "")
            raise NonFiniteError(
                f"refusing to write a checkpoint: {len(bad)} of {len(tensors)} tensors hold "
                f"NaN/inf ({shown}); {self._where(trainer)}."
            )


def batchnorm_stats(module: nn.Module) -> list[torch.Tensor]:
    """The running statistics of every BatchNorm in ``module`` (a forward in train mode changes
    them even when the optimizer step is then skipped)."""
    stats = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            stats += [
                b for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None
            ]
    return stats
