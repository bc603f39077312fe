"""`ReferenceFeeder`: adds samples of the reference distribution to training batches.

``feed(batch)`` adds, in place, to a dict batch on its device:

* ``batch["reference"]``: float32 ``(B, C, H, W)``, one sample per batch item;
* ``batch["reference_label"]``: int64 ``(B,)``, when the source has labels.

It runs in the training process on the batch's (= the module's) device, never in loader
workers, so sources that run a network (encoder features) use the accelerator and the trainer's
precision context, and sources that cache features write the cache from the main process.

Randomness: the generator of training feed number ``step`` on rank ``r`` is seeded with
``step_seed(seed ^ salt, step, r)`` (:func:`~dmvae_lightning.utils.rng.step_seed`), so ranks draw
different samples while the only state, ``step``, is the same on every rank; checkpoints store
``{"name", "step", "source"}`` (source state = fitted reductions) and a resumed run continues the
same streams. Held-out feeds (validation) use another salt and the batch's first item index.

Two ways to use it (pick one, never both):

* with :class:`~dmvae_lightning.data.reference.ReferenceDistribution`: set
  ``data.init_args.reference`` and nothing else; the data module owns a feeder and calls it from
  its ``on_after_batch_transfer`` hook (its state is in the data module's checkpoint state);
* with another data module whose batches are dicts with ``"image"``, ``"label"`` (and
  ``"index"`` for feature caches): list it in ``trainer.callbacks``; it feeds in
  ``on_train_batch_start`` and reads ``classes`` / ``train_set`` / ``image_shape`` from
  ``trainer.datamodule`` when present.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from dmvae_lightning.data.sources import (
    Draw,
    ReferenceSource,
    ReferenceSpec,
    SourceContext,
    build_source,
)
from dmvae_lightning.utils.rng import step_seed

__all__ = ["ReferenceFeeder"]

_STREAM_SALT = 0x2EFE_2E7C_E5  # separates the reference streams from the training-step seeds
_HELD_OUT_SALT = 0x0DDB_A11_5EED  # the held-out (validation) stream


class ReferenceFeeder(Callback):
    """Feeds ``batch["reference"]`` (and ``"reference_label"``) from a reference source.

    Args:
        reference: a :class:`~dmvae_lightning.data.sources.ReferenceSpec` or a built
            :class:`~dmvae_lightning.data.sources.ReferenceSource`.
        seed: seed of the sample streams (mixed with the feed count and the rank).
        image_key, label_key, index_key: batch keys of the images, labels and training-set
            positions (the latter two are optional in a batch).
        option: name of the setting in error messages.
    """

    def __init__(
        self,
        reference: ReferenceSpec | ReferenceSource,
        seed: int = 0,
        image_key: str = "image",
        label_key: str = "label",
        index_key: str = "index",
        option: str = "reference",
    ) -> None:
        super().__init__()
        if isinstance(reference, ReferenceSource):
            self.source = reference
        else:
            self.source = build_source(reference, option=option)
        self.seed = int(seed)
        self.image_key, self.label_key, self.index_key = image_key, label_key, index_key
        self.step = 0
        self._prepared = False

    # ------------------------------------------------------------------ core
    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one reference sample."""
        return self.source.shape

    def prepare(self, context: SourceContext) -> None:
        """Let the source load networks / open files (once per process and stage set-up)."""
        self.source.prepare(context)
        self._prepared = True

    def generator(self, step: int, rank: int, device: torch.device | str) -> torch.Generator:
        """The generator of feed ``step`` on ``rank``, on ``device``."""
        seed = step_seed(self.seed ^ _STREAM_SALT, step, rank)
        return torch.Generator(device=device).manual_seed(seed)

    def feed(
        self,
        batch: dict[str, Any],
        rank: int = 0,
        forward_context: Callable[[], contextlib.AbstractContextManager] | None = None,
        held_out: bool = False,
    ) -> dict[str, Any]:
        """Add ``"reference"`` (and ``"reference_label"``) to ``batch`` in place and return it.

        Training feeds (``held_out=False``) draw from the stream of (``step``, ``rank``) and
        count one step. Held-out feeds (validation / test) draw from a separate stream keyed by
        the batch's first ``"index"`` (not by rank or step), so they repeat every epoch and
        never touch ``step`` or the feature cache. ``forward_context`` wraps
        networks (e.g. the trainer's autocast)."""
        if not isinstance(batch, dict):
            raise TypeError(f"ReferenceFeeder needs dict batches, got {type(batch).__name__}")
        if not self._prepared:
            self.prepare(SourceContext())
        tensors = [v for v in batch.values() if isinstance(v, torch.Tensor) and v.ndim > 0]
        if not tensors:
            raise ValueError("ReferenceFeeder: the batch holds no tensor to take its size from")
        images = batch.get(self.image_key)
        first = images if isinstance(images, torch.Tensor) else tensors[0]
        indices = batch.get(self.index_key)
        if held_out:
            if indices is None:
                raise ValueError(
                    f"held-out reference feeds are keyed by batch[{self.index_key!r}]; the "
                    "batch has none"
                )
            seed = step_seed(self.seed ^ _HELD_OUT_SALT, int(indices.reshape(-1)[0]), 0)
            generator = torch.Generator(device=first.device).manual_seed(seed)
            indices = None  # feature-cache rows are training-set positions
        else:
            generator = self.generator(self.step, rank, first.device)
        request = Draw(
            n=int(first.shape[0]),
            generator=generator,
            labels=batch.get(self.label_key),
            images=images if self.source.uses_images else None,
            indices=indices,
            forward_context=forward_context or contextlib.nullcontext,
        )
        z, labels = self.source.draw(request)
        batch["reference"] = z
        if labels is not None:
            batch["reference_label"] = labels
        if not held_out:
            self.step += 1
        return batch

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """``{"step", "source"}``: identical on every rank (only rank 0's is saved)."""
        return {"name": self.source.name, "step": self.step, "source": self.source.state_dict()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        name = state_dict.get("name")
        if name is not None and name != self.source.name:
            raise ValueError(
                f"the checkpoint's reference source is {name!r} but the configured one is "
                f"{self.source.name!r} (data.init_args.reference.name); resume with the same source"
            )
        self.step = int(state_dict.get("step", 0))
        self.source.load_state_dict(state_dict.get("source", {}))

    # ------------------------------------------------------------------ callback mode
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Callback mode: prepare the source from what ``trainer.datamodule`` offers."""
        datamodule = getattr(trainer, "datamodule", None)
        owner = getattr(datamodule, "feeder", None)
        if owner is not None and owner is not self:
            raise ValueError(
                "ReferenceFeeder is listed in trainer.callbacks but the data module feeds "
                "references itself (data.init_args.reference); remove one of the two"
            )
        if owner is self:
            return
        image_shape = getattr(datamodule, "image_shape", None) or (3,)
        classes = getattr(datamodule, "classes", None)
        train_set = getattr(datamodule, "train_set", None)
        self.prepare(
            SourceContext(
                image_channels=int(image_shape[0]),
                num_classes=len(classes) if classes else int(getattr(datamodule, "num_classes", 0)),
                class_names=list(classes) if classes else None,
                train_set=train_set,
                dataset_id=f"{type(train_set).__name__}(n={len(train_set) if train_set else 0})",
                local_zero=trainer.local_rank == 0,
                barrier=trainer.strategy.barrier,
                broadcast=trainer.strategy.broadcast,
            )
        )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if getattr(trainer.datamodule, "feeder", None) is self:
            return  # the data module feeds through its own hook
        self.feed(batch, trainer.global_rank, trainer.precision_plugin.forward_context)
