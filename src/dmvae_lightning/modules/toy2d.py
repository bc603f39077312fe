"""PointAlignmentModule: the paper's 2-D toy study (PAPER.md section 2, Figure 3).

The "latents" are ``num_points`` learnable 2-D points, an ``nn.Parameter`` shaped
(N, 2, 1, 1) (C = 2, H = W = 1: one 2-channel token for a patch-1 DiT), initialised
U[-init_range, init_range]^2, moved by a matching loss towards a reference density (the
``s_shape`` source by default):

* :class:`~dmvae_lightning.losses.matching.DMDLoss` (any ``objective``: ``dmd``,
  ``loss_difference``, ``real_only``, ``fake_only``, ``score_l2``): its frozen real model is a
  :class:`~dmvae_lightning.modules.diffusion.LatentDiffusionModule` trained on the reference
  (``real_model`` = checkpoint path); the points are mapped into its normalised space with
  ``DMDLoss.normalize``. The fake model trains on **every** batch (flow matching on
  ``fake_batch`` stop-gradient points drawn at random, optimiser over
  ``DMDLoss.fake_parameters()``) unless the objective never reads it (``real_only``);
* any loss called as ``loss(points (N, 2), reference (N, 2))`` (``MMDLoss``,
  ``SlicedWassersteinLoss``): each points step draws N fresh reference samples.

The points step on batches ``k`` (0-based, counted by the checkpointed ``batch_count`` buffer, not
``trainer.global_step``, which counts optimizer steps) with ``k >= fake_warmup`` and
``(k + 1) % points_every == 0``: batches 4, 9, 14, ... for ``points_every = 5``. ``points_steps``
counts them and is the ``step`` given to ``DMDLoss`` (t-range annealing).

Data: the module serves its own training loader (``batches_per_epoch`` empty batches: a clock),
so no data module is needed; the batches' content is never read. Randomness of batch ``k`` (fake
subset, t, noise, reference draws) comes from ``step_rng(seed, k, rank)``, so runs repeat
exactly. Single-process only (the points are one shared set; there is nothing to shard).

Evaluation (every epoch end and at the end of training): :func:`cloud_metrics` of the points
against ``eval_reference`` fresh reference samples (fixed, from ``seed``), logged as
``toy/sw2``, ``toy/energy``, ``toy/coverage``, ``toy/precision``; at the end (and every
``plot_every_n_epochs``) figures of the points over the reference and, for ``DMDLoss``, of the
objective's update field at each t in ``field_times``: the mean over ``field_draws`` noise draws
of ``-dL/dz`` per grid point (for ``dmd`` this is ``(x_hat_real - x_hat_fake) / mean|z -
x_hat_real|`` times ``latent_scale``, the DMD direction). Time convention: t = 1 data, t = 0
noise. Figures go to TensorBoard (``add_figure``) and, with ``plot_dir``, to PNG files there
together with ``metrics.json`` and ``points.pt``.

Hooks to override: :meth:`configure_points`, :meth:`draw_reference`, :meth:`fake_step`,
:meth:`matching_loss`, :meth:`update_field`, :meth:`evaluate`, :meth:`log_figures`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.utils.data import DataLoader

from dmvae_lightning.data.sources import Draw, ReferenceSpec, build_source
from dmvae_lightning.losses.matching import DMDLoss
from dmvae_lightning.metrics.distances import cloud_metrics
from dmvae_lightning.modules.common import (
    build_optimizer,
    build_scheduler,
    drop_callables_from_hparams,
)
from dmvae_lightning.utils.rng import step_rng, step_seed

__all__ = ["PointAlignmentModule"]

_REFERENCE_SALT = 0x7E_F5A3_9C01  # per-step reference draws for MMD / SWD
_EVAL_SALT = 0x3D_A1C7_55E2  # the fixed evaluation reference
_FIELD_SALT = 0x51_0F1E_1D00  # the update-field noise
_OPTION = "model.init_args"


class _Clock(torch.utils.data.Dataset):
    """``length`` items, each the int64 scalar of its index (content is never used)."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Tensor:
        return torch.tensor(index, dtype=torch.long)


class PointAlignmentModule(pl.LightningModule):
    """Learnable 2-D points aligned to a reference with a matching loss (module docstring).

    Args:
        loss: the matching loss: a ``DMDLoss`` (``real_model`` = a LatentDiffusionModule
            checkpoint trained on the reference, e.g. ``configs/toy2d/real.yaml``) or a loss
            called as ``loss(points (N, 2), reference (N, 2))`` (``MMDLoss``,
            ``SlicedWassersteinLoss``).
        num_points: N, the number of points.
        init_range: points start U[-init_range, init_range]^2 (paper: 1.5).
        reference: the reference source (:class:`~dmvae_lightning.data.sources.ReferenceSpec`,
            shape [2, 1, 1]); default ``{"name": "s_shape"}``.
        lr, betas, weight_decay: AdamW on the points (no weight decay: it would pull them to 0).
        fake_lr, fake_betas: AdamW on the DMD fake model.
        fake_grad_clip: gradient-norm clip of the fake model (None: off).
        points_every: the points step every this many batches (paper: 5).
        fake_batch: points per fake-model step, drawn at random without replacement (None:
            all N).
        fake_warmup: batches before the first points step (the fake model starts equal to
            the real one, so the DMD direction is 0 until it has learnt the points).
        batches_per_epoch: length of the module's own training loader.
        seed: seeds the initial points, the per-batch random streams and the evaluation
            reference.
        eval_reference: fresh reference samples the metrics compare the points with.
        coverage_radius: radius of ``coverage`` / ``precision``.
        field_times: t values of the update-field panels.
        field_grid: G, the field is drawn on a G x G grid over [-init_range, init_range]^2.
        field_draws: noise draws averaged per grid point.
        plot_dir: folder for PNGs, ``metrics.json`` and ``points.pt`` (None: TensorBoard only).
        plot_every_n_epochs: also plot at every n-th epoch end (0: at the end only).
        name: the run's name in figure titles (default: the objective or the loss class).
        label: class label of every point for ``DMDLoss`` (both score models and the fake
            training): 0 for a real model trained on one class (``configs/toy2d/real.yaml``);
            None passes no labels (the null class, for a model trained with label dropout).
        optimizer, fake_optimizer: injected optimizers of the points and of the DMD fake model
            (``lightning.pytorch.cli.OptimizerCallable``); None: AdamW with ``lr`` / ``betas``
            / ``weight_decay`` and ``fake_lr`` / ``fake_betas`` / no weight decay.
        scheduler, fake_scheduler: injected schedulers (``LRSchedulerCallable``), stepped
            after each step of their optimizer; None: a constant learning rate.
    """

    def __init__(
        self,
        loss: nn.Module,
        num_points: int = 1536,
        init_range: float = 1.5,
        reference: ReferenceSpec | None = None,
        lr: float = 2e-2,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.0,
        fake_lr: float = 1e-3,
        fake_betas: tuple[float, float] = (0.9, 0.95),
        fake_grad_clip: float | None = 1.0,
        points_every: int = 5,
        fake_batch: int | None = 256,
        fake_warmup: int = 0,
        batches_per_epoch: int = 100,
        seed: int = 0,
        eval_reference: int = 2048,
        coverage_radius: float = 0.03,
        field_times: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
        field_grid: int = 15,
        field_draws: int = 8,
        plot_dir: str | None = None,
        plot_every_n_epochs: int = 0,
        name: str | None = None,
        label: int | None = 0,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        fake_optimizer: OptimizerCallable | None = None,
        fake_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["loss"])
        drop_callables_from_hparams(
            self, ("optimizer", "scheduler", "fake_optimizer", "fake_scheduler")
        )
        self._factories = dict(
            optimizer=optimizer,
            scheduler=scheduler,
            fake_optimizer=fake_optimizer,
            fake_scheduler=fake_scheduler,
        )
        self.automatic_optimization = False
        self.loss = loss
        self._check_arguments()
        spec = dict(reference) if reference is not None else {"name": "s_shape"}
        self.source = build_source(spec, option=f"{_OPTION}.reference")
        if tuple(self.source.shape) != (2, 1, 1):
            raise ValueError(
                f"{_OPTION}.reference must give 2-D points (shape [2, 1, 1]), got "
                f"{list(self.source.shape)}"
            )
        self.register_buffer("batch_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("points_steps", torch.zeros((), dtype=torch.long))
        self.configure_points()
        self.final_metrics: dict[str, float] = {}
        self._eval_reference: Tensor | None = None

    def _check_arguments(self) -> None:
        hp = self.hparams
        for key in ("num_points", "points_every", "batches_per_epoch", "eval_reference"):
            if int(hp[key]) < 1:
                raise ValueError(f"{_OPTION}.{key} must be >= 1, got {hp[key]}")
        if hp.fake_batch is not None and hp.fake_batch < 1:
            raise ValueError(f"{_OPTION}.fake_batch must be >= 1 or null, got {hp.fake_batch}")
        if hp.fake_warmup < 0 or hp.plot_every_n_epochs < 0:
            raise ValueError(f"{_OPTION}.fake_warmup and plot_every_n_epochs must be >= 0")
        if hp.init_range <= 0 or hp.coverage_radius <= 0:
            raise ValueError(f"{_OPTION}.init_range and coverage_radius must be > 0")
        if hp.field_grid < 2 or hp.field_draws < 1:
            raise ValueError(f"{_OPTION}.field_grid must be >= 2 and field_draws >= 1")
        if any(not 0.0 <= float(t) < 1.0 for t in hp.field_times):
            raise ValueError(
                f"{_OPTION}.field_times must lie in [0, 1) (t = 1 is data), got "
                f"{list(hp.field_times)}"
            )
        if not isinstance(self.loss, nn.Module):
            raise TypeError(
                f"{_OPTION}.loss must be a matching-loss module (class_path + init_args), got "
                f"{type(self.loss).__name__}"
            )

    # ------------------------------------------------------------------ hooks
    @staticmethod
    def uniform_points(num_points: int, init_range: float, seed: int) -> Tensor:
        """(num_points, 2, 1, 1) fp32, U[-init_range, init_range]^2 from a generator seeded
        by ``seed`` (the initial points)."""
        gen = torch.Generator().manual_seed(int(seed))
        return (2.0 * torch.rand(num_points, 2, 1, 1, generator=gen) - 1.0) * init_range

    def configure_points(self) -> None:
        """Create ``self.points``, the nn.Parameter (N, 2, 1, 1): :meth:`uniform_points`."""
        hp = self.hparams
        self.points = nn.Parameter(self.uniform_points(hp.num_points, hp.init_range, hp.seed))

    @property
    def is_dmd(self) -> bool:
        """Whether the loss is a :class:`DMDLoss` (score-model objectives)."""
        return isinstance(self.loss, DMDLoss)

    @property
    def trains_fake(self) -> bool:
        """Whether a fake model is trained (a DMDLoss whose objective reads it)."""
        return self.is_dmd and self.loss.objective != "real_only"

    @property
    def run_name(self) -> str:
        if self.hparams.name:
            return str(self.hparams.name)
        return self.loss.objective if self.is_dmd else type(self.loss).__name__

    def draw_reference(self, n: int, generator: torch.Generator) -> Tensor:
        """(n, 2, 1, 1) reference samples from ``generator`` (all randomness from it)."""
        z, _ = self.source.draw(Draw(n=n, generator=generator))
        return z.float()

    def labels(self, n: int) -> Tensor | None:
        """(n,) int64 labels ``label`` for ``DMDLoss``, or None when ``label`` is None."""
        label = self.hparams.label
        if label is None:
            return None
        return torch.full((n,), int(label), dtype=torch.long, device=self.device)

    def is_points_batch(self, batch_index: int) -> bool:
        """Whether the points step on batch ``batch_index`` (0-based, see module docstring)."""
        hp = self.hparams
        return batch_index >= hp.fake_warmup and (batch_index + 1) % hp.points_every == 0

    def fake_step(self, optimizer: torch.optim.Optimizer) -> Tensor:
        """One fake-model step on ``fake_batch`` random stop-gradient points; returns its loss."""
        hp = self.hparams
        points = self.points.detach()
        if hp.fake_batch is not None and hp.fake_batch < points.shape[0]:
            index = torch.randperm(points.shape[0], device=points.device)[: hp.fake_batch]
            points = points[index]
        loss = self.loss.fake_loss(self.loss.normalize(points), self.labels(points.shape[0]))
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if hp.fake_grad_clip:
            self.clip_gradients(optimizer, gradient_clip_val=float(hp.fake_grad_clip))
        optimizer.step()
        self._step_scheduler(1)
        return loss.detach()

    def matching_loss(self, step: int) -> Tensor:
        """The matching loss of all points (scalar, differentiable w.r.t. ``self.points``)."""
        if self.is_dmd:
            z = self.loss.normalize(self.points)
            return self.loss(z, self.labels(z.shape[0]), step)
        n = self.points.shape[0]
        gen = torch.Generator(self.device).manual_seed(
            step_seed(self.hparams.seed ^ _REFERENCE_SALT, step, self.global_rank)
        )
        reference = self.draw_reference(n, gen)
        return self.loss(self.points.reshape(n, -1), reference.reshape(n, -1))

    # ------------------------------------------------------------------ Lightning: training
    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Clock(self.hparams.batches_per_epoch), batch_size=1)

    def configure_optimizers(self):
        """The points' optimizer and (with a trained DMD fake model) the fake model's: the
        injected ones, else AdamW; with an injected scheduler, one scheduler per optimizer
        (constant where none is given)."""
        hp, make = self.hparams, self._factories
        optimizers = [
            build_optimizer(make["optimizer"], [self.points], hp.lr, hp.betas, hp.weight_decay)
        ]
        factories = [make["scheduler"]]
        if self.trains_fake:
            fake = [p for p in self.loss.fake_parameters() if p.requires_grad]
            optimizers.append(
                build_optimizer(make["fake_optimizer"], fake, hp.fake_lr, hp.fake_betas)
            )
            factories.append(make["fake_scheduler"])
        if all(f is None for f in factories):
            return optimizers
        schedulers = [
            {"scheduler": build_scheduler(f, opt, 0), "interval": "step"}
            for f, opt in zip(factories, optimizers, strict=True)
        ]
        return optimizers, schedulers

    def _step_scheduler(self, index: int) -> None:
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return
        schedulers = schedulers if isinstance(schedulers, list) else [schedulers]
        schedulers[index].step()

    def training_step(self, batch: Any, batch_idx: int) -> None:
        optimizers = self.optimizers()
        if not isinstance(optimizers, list):
            optimizers = [optimizers]
        step = int(self.batch_count)
        logs: dict[str, Tensor] = {}
        with step_rng(self.hparams.seed, step, self.global_rank, self.device):
            if self.trains_fake:
                logs["train/fake_loss"] = self.fake_step(optimizers[1])
            if self.is_points_batch(step):
                opt = optimizers[0]
                loss = self.matching_loss(int(self.points_steps))
                opt.zero_grad(set_to_none=True)
                self.manual_backward(loss)
                opt.step()
                self._step_scheduler(0)
                self.points_steps += 1
                logs["train/matching_loss"] = loss.detach()
        self.batch_count += 1
        if logs:
            self.log_dict(logs, on_step=True, on_epoch=False, batch_size=1)

    # ------------------------------------------------------------------ evaluation
    def eval_reference(self) -> Tensor:
        """The fixed evaluation reference (``eval_reference``, 2) on the CPU (drawn once)."""
        if self._eval_reference is None:
            gen = torch.Generator().manual_seed(step_seed(self.hparams.seed ^ _EVAL_SALT, 0))
            ref = self.draw_reference(self.hparams.eval_reference, gen)
            self._eval_reference = ref.reshape(-1, 2)
        return self._eval_reference

    def evaluate(self) -> dict[str, float]:
        """:func:`~dmvae_lightning.metrics.distances.cloud_metrics` of the points against the
        evaluation reference (radius ``coverage_radius``)."""
        points = self.points.detach().reshape(-1, 2).cpu()
        return cloud_metrics(points, self.eval_reference(), radius=self.hparams.coverage_radius)

    def field_grid(self) -> Tensor:
        """(G*G, 2) grid over [-init_range, init_range]^2, row-major in y then x."""
        hp = self.hparams
        axis = torch.linspace(-hp.init_range, hp.init_range, hp.field_grid)
        gy, gx = torch.meshgrid(axis, axis, indexing="ij")
        return torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)

    def update_field(self, t: float, grid: Tensor | None = None) -> Tensor:
        """(G, 2) mean update direction ``-dL/dz`` (per point, i.e. the gradient of the sum) at
        the fixed time ``t`` over ``field_draws`` noise draws, at ``grid`` (G, 2) raw points
        (default :meth:`field_grid`). DMDLoss only."""
        if not self.is_dmd:
            raise TypeError("update_field needs a DMDLoss (score-model objectives have a t)")
        hp = self.hparams
        grid = self.field_grid() if grid is None else grid
        g = grid.shape[0]
        z = grid.to(self.device).repeat(hp.field_draws, 1).reshape(-1, 2, 1, 1)
        gen = torch.Generator().manual_seed(step_seed(hp.seed ^ _FIELD_SALT, int(t * 1e6)))
        eps = torch.randn(z.shape, generator=gen).to(self.device)
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            z_norm = self.loss.normalize(z)
            value, _ = self.loss.loss(z_norm, self.labels(z.shape[0]), t=float(t), eps=eps)
            (grad,) = torch.autograd.grad(value, z)
        direction = -(grad * z.numel()).reshape(hp.field_draws, g, 2).mean(0)
        return direction.detach().cpu()

    def log_figures(self, tag: str = "final") -> dict[str, Any]:
        """Build the figures (points over the reference; the update field for DMDLoss), send
        them to TensorBoard and, with ``plot_dir``, save ``points_<tag>.png`` /
        ``field_<tag>.png``. Returns ``{name: figure}``."""
        from dmvae_lightning import plots

        name = self.run_name
        reference = self.eval_reference()
        figures = {
            "points": plots.points_figure(
                self.points.detach().cpu(),
                reference,
                title=f"{name}: {int(self.points_steps)} point steps",
            )
        }
        if self.is_dmd:
            grid = self.field_grid()
            fields = [
                (float(t), self.update_field(float(t), grid)) for t in self.hparams.field_times
            ]
            figures["field"] = plots.field_figure(
                grid, fields, reference, title=f"{name}: update direction -dL/dz"
            )
        experiment = getattr(self.logger, "experiment", None) if self._trainer else None
        for key, fig in figures.items():
            if experiment is not None and hasattr(experiment, "add_figure"):
                experiment.add_figure(f"toy/{key}", fig, self.global_step, close=False)
            if self.hparams.plot_dir:
                plots.save_figure(fig, Path(self.hparams.plot_dir) / f"{key}_{tag}.png")
        return figures

    def on_train_epoch_end(self) -> None:
        metrics = self.evaluate()
        self.log_dict({f"toy/{k}": v for k, v in metrics.items()}, on_epoch=True, batch_size=1)
        every = self.hparams.plot_every_n_epochs
        if every and (self.current_epoch + 1) % every == 0:
            self.log_figures(tag=f"epoch{self.current_epoch + 1}")

    def on_train_end(self) -> None:
        """Final metrics (``self.final_metrics``), figures and, with ``plot_dir``,
        ``metrics.json`` and ``points.pt`` ((N, 2) fp32)."""
        self.final_metrics = self.evaluate()
        self.final_metrics["points_steps"] = int(self.points_steps)
        self.log_figures()
        if self.hparams.plot_dir:
            out = Path(self.hparams.plot_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.json").write_text(json.dumps(self.final_metrics, indent=2) + "\n")
            torch.save(self.points.detach().reshape(-1, 2).cpu(), out / "points.pt")
