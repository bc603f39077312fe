"""ClassifierModule: a supervised image classifier as a LightningModule.

Uses in the Fashion-MNIST pipeline (``configs/fashion_mnist/classifier.yaml``,
``configs/fashion_mnist/fid_net.yaml`` and, without labels, ``configs/fashion_mnist/ssl.yaml``):

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

__all__ = ["ClassifierModule", "load_classifier", "nt_xent", "simclr_views"]


class ClassifierModule(pl.LightningModule):
    """Cross-entropy training of a :class:`~dmvae_lightning.nets.classifier.ConvClassifier`.

    Args:
        in_channels, num_classes, widths, norm, dropout, blocks, stem_stride: the network (see ConvClassifier).
        lr, weight_decay, warmup_steps: AdamW with linear warm-up.
        label_smoothing: cross-entropy label smoothing.
        random_flip: random horizontal flips of the training images (p = 0.5).
        objective: ``"supervised"`` (cross-entropy on the labels) or ``"simclr"`` (labels unused:
            NT-Xent between two augmented views, :func:`simclr_views`, :func:`nt_xent`).
        ssl_temperature, ssl_proj_dim: NT-Xent temperature and projection-head width (simclr).
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
        objective: Literal["supervised", "simclr"] = "supervised",
        ssl_temperature: float = 0.2,
        ssl_proj_dim: int = 64,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        drop_callables_from_hparams(self, ("optimizer", "scheduler"))
        self._optimizer_factory, self._scheduler_factory = optimizer, scheduler
        if objective not in ("supervised", "simclr"):
            raise ValueError(
                f"model.init_args.objective must be 'supervised' or 'simclr', got {objective!r}"
            )
        self.net = ConvClassifier(
            in_channels, num_classes, widths, norm, dropout, blocks, stem_stride
        )
        self.projector = None
        if objective == "simclr":
            width = self.net.out_dim
            self.projector = torch.nn.Sequential(
                torch.nn.Linear(width, width), torch.nn.SiLU(), torch.nn.Linear(width, ssl_proj_dim)
            )
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = self.val_acc.clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) of images (B, C, H, W) in [-1, 1]."""
        return self.net(x)

    def configure_optimizers(self):
        hp = self.hparams
        params = list(self.net.parameters())
        if getattr(self, "projector", None) is not None:  # the simclr projection head
            params += list(self.projector.parameters())
        opt = build_optimizer(self._optimizer_factory, params, hp.lr, weight_decay=hp.weight_decay)
        sched = build_scheduler(self._scheduler_factory, opt, hp.warmup_steps)
        return [opt], [{"scheduler": sched, "interval": "step"}]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x = batch["image"]
        if self.projector is not None:  # self-supervised: labels are neither needed nor read
            loss = self.ssl_loss(x)
            self.log("train/ssl_loss", loss, prog_bar=True, batch_size=x.shape[0])
            return loss
        if self.hparams.random_flip:
            flip = torch.rand(x.shape[0], device=x.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if "label" not in batch:
            raise KeyError(
                "the supervised classifier needs batch['label'] (a labelled data set), or "
                "model.init_args.objective: simclr to train without labels"
            )
        y = batch["label"]
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        acc = (logits.argmax(1) == y).float().mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=x.shape[0])
        self.log("train/acc", acc, batch_size=x.shape[0])
        return loss

    def ssl_loss(self, x: torch.Tensor) -> torch.Tensor:
        """NT-Xent loss of two augmented views of images ``x`` (B, C, H, W) in [-1, 1]
        (random draws from the global RNG)."""
        views = simclr_views(x)
        proj = self.projector(self.net.embed(views))
        return nt_xent(proj, self.hparams.ssl_temperature)

    def _eval_step(self, batch: dict[str, torch.Tensor], metric: MulticlassAccuracy, name: str):
        if self.projector is not None:  # self-supervised: the contrastive loss on val images
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                loss = self.ssl_loss(batch["image"])
            self.log(name.replace("acc", "ssl_loss"), loss, batch_size=batch["image"].shape[0])
            return
        logits = self(batch["image"])
        metric.update(logits, batch["label"])
        self.log(name, metric, prog_bar=True, batch_size=logits.shape[0])

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.val_acc, "val/acc")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.test_acc, "test/acc")


def simclr_views(x: torch.Tensor, min_scale: float = 0.5) -> torch.Tensor:
    """Two random views of each image, stacked as (2B, C, H, W): view ``i`` and ``B + i`` come
    from image ``i``. Each view: a random crop of ``min_scale``..1 of the side at a random place,
    resized back (bilinear, border padding), a horizontal flip with p = 0.5, and an intensity
    jitter ``a x + b`` (a in [0.6, 1.4], b in [-0.3, 0.3]) clamped to [-1, 1]. Global RNG."""
    both = torch.cat([x, x])
    n = both.shape[0]
    scale = min_scale + (1 - min_scale) * torch.rand(n, device=x.device)
    shift = (1 - scale)[:, None] * (2 * torch.rand(n, 2, device=x.device) - 1)
    flip = torch.where(torch.rand(n, device=x.device) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = scale * flip
    theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(both.shape), align_corners=False)
    views = F.grid_sample(both, grid, padding_mode="border", align_corners=False)
    gain = 0.6 + 0.8 * torch.rand(n, 1, 1, 1, device=x.device)
    bias = 0.6 * torch.rand(n, 1, 1, 1, device=x.device) - 0.3
    return (gain * views + bias).clamp(-1, 1)


def nt_xent(projections: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent loss of projections (2B, D) whose rows ``i`` and ``B + i`` are the two
    views of one image: cross-entropy of each row's cosine similarities / ``temperature`` to
    the other 2B - 1 rows, with its partner as the target."""
    z = F.normalize(projections.float(), dim=1)
    n = z.shape[0]
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(n, dtype=torch.bool, device=z.device), float("-inf"))
    target = (torch.arange(n, device=z.device) + n // 2) % n
    return F.cross_entropy(logits, target)
