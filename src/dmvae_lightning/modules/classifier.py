"""ClassifierModule: a supervised image classifier as a LightningModule.

Two uses in the Fashion-MNIST pipeline (``configs/fashion_mnist/classifier.yaml`` and
``configs/fashion_mnist/fid_net.yaml``):

* the frozen "foundation" encoder of the tokenizer (``encoder: {name: classifier, weights_path:
  ...}``), the CPU-scale stand-in for the paper's DINOv2 / supervised-feature reference;
* the offline domain feature network for FID (:mod:`dmvae_lightning.metrics`), trained with
  another seed and another design so that it is independent of the encoder it evaluates.

Batches are dicts ``{"image": (B, C, H, W) in [-1, 1], "label": (B,) int64}`` from
:class:`~dmvae_lightning.data.reference.ReferenceDistribution`.
"""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics.classification import MulticlassAccuracy

from dmvae_lightning.checkpoints import load_classifier
from dmvae_lightning.modules.common import (
    build_optimizer,
    build_scheduler,
    drop_callables_from_hparams,
)
from dmvae_lightning.nets.classifier import ConvClassifier

__all__ = ["ClassifierModule", "load_classifier"]


class ClassifierModule(pl.LightningModule):
    """Cross-entropy training of a :class:`~dmvae_lightning.nets.classifier.ConvClassifier`.

    Args:
        in_channels, num_classes, widths, norm, dropout, blocks, stem_stride: the network (see ConvClassifier).
        lr, weight_decay, warmup_steps: AdamW with linear warm-up.
        label_smoothing: cross-entropy label smoothing.
        random_flip: random horizontal flips of the training images (p = 0.5).
        optimizer, scheduler: injected optimizer / scheduler (``OptimizerCallable`` /
            ``LRSchedulerCallable``); None: AdamW (``lr``, ``weight_decay``, default betas) and
            linear warm-up.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        widths: list[int] | tuple[int, ...] = (32, 64),
        norm: Literal["group", "batch"] = "group",
        dropout: float = 0.0,
        blocks: int = 1,
        stem_stride: int = 2,
        lr: float = 2e-3,
        weight_decay: float = 1e-4,
        warmup_steps: int = 50,
        label_smoothing: float = 0.0,
        random_flip: bool = False,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        drop_callables_from_hparams(self, ("optimizer", "scheduler"))
        self._optimizer_factory, self._scheduler_factory = optimizer, scheduler
        self.net = ConvClassifier(
            in_channels, num_classes, widths, norm, dropout, blocks, stem_stride
        )
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = self.val_acc.clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) of images (B, C, H, W) in [-1, 1]."""
        return self.net(x)

    def configure_optimizers(self):
        hp = self.hparams
        opt = build_optimizer(
            self._optimizer_factory, self.net.parameters(), hp.lr, weight_decay=hp.weight_decay
        )
        sched = build_scheduler(self._scheduler_factory, opt, hp.warmup_steps)
        return [opt], [{"scheduler": sched, "interval": "step"}]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch["image"], batch["label"]
        if self.hparams.random_flip:
            flip = torch.rand(x.shape[0], device=x.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        acc = (logits.argmax(1) == y).float().mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=x.shape[0])
        self.log("train/acc", acc, batch_size=x.shape[0])
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], metric: MulticlassAccuracy, name: str):
        logits = self(batch["image"])
        metric.update(logits, batch["label"])
        self.log(name, metric, prog_bar=True, batch_size=logits.shape[0])

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.val_acc, "val/acc")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.test_acc, "test/acc")
