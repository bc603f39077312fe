"""FIDMonitor: rFID (tokenizer) or a gFID proxy (diffusion) during training, on a fixed subset,
with TensorBoard views of images and latents.

Every ``every_n_batches`` training batches, on rank 0 only (no collective op inside; the other
ranks wait at their next gradient all-reduce), with EMA weights and in eval mode:

* tokenizer (a module with ``encode`` / ``decode``, e.g. DMVAEModule): reconstruct the subset,
  log ``eval/rfid`` and ``eval/psnr``, a grid of originals over reconstructions, a histogram of
  the latents and, when batches carry reference samples, the reference's histogram;
* diffusion (a module with ``sample`` / ``dit``, e.g. LatentDiffusionModule): draw one sample per
  subset label (fixed noise, ``sample_steps`` Euler steps), log ``eval/gfid_proxy`` when a
  tokenizer decodes them, a grid of samples and histograms of generated vs data latents;
* both: a 2-D projection (PCA; t-SNE with ``projection: tsne``, needs scikit-learn) of the
  latents next to the reference latents, coloured by class (``add_figure``).

The subset is the first ``num_samples`` validation items (``datamodule.reference_sample(n)`` when
the data module has one, so reference samples come along). Its feature statistics are computed
once and cached on disk by content hash and extractor identity
(:class:`~dmvae_lightning.metrics.stats.StatsCache`). The feature network is held by the
callback, outside the LightningModule: never in checkpoints. Add to a config::

    trainer:
      callbacks:
        - class_path: dmvae_lightning.callbacks.FIDMonitor
          init_args:
            extractor: {name: domain, checkpoint: runs/fashion_mnist/checkpoints/fid_net.ckpt}
            every_n_batches: 500
            num_samples: 1000
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torchvision
from lightning.pytorch.utilities import rank_zero_warn

from dmvae_lightning.metrics.extractors import FeatureExtractor, build_extractor
from dmvae_lightning.metrics.fid import feature_stats, frechet_distance
from dmvae_lightning.metrics.stats import StatsCache

__all__ = ["FIDMonitor", "project_2d"]


def project_2d(
    points: torch.Tensor, method: Literal["pca", "tsne"] = "pca", seed: int = 0
) -> torch.Tensor:
    """Rows of ``points`` (N, D) -> (N, 2): PCA (top two principal axes, fp64) or t-SNE
    (scikit-learn)."""
    x = points.detach().double().cpu().flatten(1)
    if method == "pca":
        x = x - x.mean(0)
        _, _, vh = torch.linalg.svd(x, full_matrices=False)
        return (x @ vh[:2].T).float()
    if method == "tsne":
        try:
            from sklearn.manifold import TSNE
        except ImportError as err:
            raise ImportError(
                "FIDMonitor projection 'tsne' needs scikit-learn (pip install scikit-learn); "
                "use projection: pca otherwise."
            ) from err
        perplexity = min(30.0, max(2.0, (x.shape[0] - 1) / 3))
        out = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x.numpy())
        return torch.from_numpy(out).float()
    raise ValueError(f"projection must be 'pca' or 'tsne', got {method!r}")


class FIDMonitor(pl.Callback):
    """rFID / gFID proxy and latent views every ``every_n_batches`` training batches.

    Args:
        extractor: feature network (:func:`~dmvae_lightning.metrics.extractors.build_extractor`):
            ``{name: inception, weights_path: ...}`` or ``{name: domain, checkpoint: ...}``.
        every_n_batches: interval in training batches (the module's ``batch_count`` when it has
            one, so the schedule survives resume).
        num_samples: size of the fixed subset.
        mode: ``"rfid"``, ``"gfid"`` or ``"auto"`` (from the module's methods).
        batch_size: chunk size of encode / decode / sample / feature passes.
        cache_dir: statistics cache folder (default ``$TORCH_HOME/dmvae_fid_stats``).
        sample_steps, sampler, cfg: diffusion sampling for the gFID proxy.
        num_images: images in the TensorBoard grid (0: none).
        histograms: log latent histograms.
        projection: ``"pca"``, ``"tsne"`` or None (no figure); ``num_projected`` points per side.
        seed: seed of the sampling noise (fixed across evaluations).
    """

    def __init__(
        self,
        extractor: dict[str, Any] | str,
        every_n_batches: int = 1000,
        num_samples: int = 512,
        mode: Literal["auto", "rfid", "gfid"] = "auto",
        batch_size: int = 64,
        cache_dir: str | None = None,
        sample_steps: int = 25,
        sampler: Literal["euler", "heun", "sde"] = "euler",
        cfg: float = 1.0,
        num_images: int = 16,
        histograms: bool = True,
        projection: Literal["pca", "tsne"] | None = "pca",
        num_projected: int = 500,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if every_n_batches < 1 or num_samples < 2:
            raise ValueError("FIDMonitor needs every_n_batches >= 1 and num_samples >= 2")
        if projection not in ("pca", "tsne", None):
            raise ValueError(f"FIDMonitor.projection must be pca, tsne or null, got {projection!r}")
        self.extractor_spec = extractor
        self.every_n_batches = every_n_batches
        self.num_samples = num_samples
        self.mode = mode
        self.batch_size = batch_size
        self.cache = StatsCache(cache_dir)
        self.sample_steps, self.sampler, self.cfg = sample_steps, sampler, cfg
        self.num_images = num_images
        self.histograms = histograms
        self.projection = projection
        self.num_projected = num_projected
        self.seed = seed
        self.extractor: FeatureExtractor | None = None
        self.subset: dict[str, torch.Tensor] | None = None
        self.last_metrics: dict[str, float] = {}
        self._warned_no_real_latents = False
        self._batches = 0

    # ------------------------------------------------------------------ schedule
    def on_fit_start(self, trainer, pl_module) -> None:
        """Refuse a module whose parameters are sharded (FSDP2): the evaluation runs on rank 0
        alone, and a sharded forward needs every rank."""
        from torch.distributed.tensor import DTensor

        if any(isinstance(p, DTensor) for p in pl_module.parameters()):
            raise RuntimeError(
                "FIDMonitor evaluates on rank 0 only and cannot run a sharded model "
                "(trainer.strategy fsdp2); use DDP for runs with FIDMonitor, or evaluate "
                "checkpoints afterwards."
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._batches += 1
        count = getattr(pl_module, "batch_count", None)
        seen = int(count) if isinstance(count, torch.Tensor) else self._batches
        if seen % self.every_n_batches == 0 and trainer.is_global_zero:
            self.evaluate(trainer, pl_module)

    # ------------------------------------------------------------------ data
    def fixed_subset(self, trainer) -> dict[str, torch.Tensor]:
        """The first ``num_samples`` validation items (CPU): ``image``, ``label`` and, when the
        data module feeds them, ``reference`` / ``reference_label``."""
        if self.subset is not None:
            return self.subset
        dm = trainer.datamodule
        n = self.num_samples
        if getattr(dm, "feeder", None) is not None and hasattr(dm, "reference_sample"):
            self.subset = {k: v.cpu() for k, v in dm.reference_sample(n).items()}
            return self.subset
        if dm is not None:
            loader = dm.val_dataloader()
        else:
            loader = trainer.val_dataloaders
        parts: dict[str, list[torch.Tensor]] = {}
        count = 0
        for batch in loader:
            for key, value in batch.items():
                if isinstance(value, torch.Tensor):
                    parts.setdefault(key, []).append(value.cpu())
            count += batch["image"].shape[0]
            if count >= n:
                break
        if count < n:
            raise ValueError(f"FIDMonitor.num_samples={n} but the validation set has {count}")
        self.subset = {key: torch.cat(values)[:n] for key, values in parts.items()}
        return self.subset

    def _resolve_mode(self, pl_module) -> str:
        if self.mode != "auto":
            return self.mode
        if hasattr(pl_module, "sample") and hasattr(pl_module, "dit"):
            return "gfid"
        if hasattr(pl_module, "encode") and hasattr(pl_module, "decode"):
            return "rfid"
        raise TypeError(
            f"FIDMonitor cannot tell what {type(pl_module).__name__} is: set mode rfid or gfid"
        )

    def _chunks(self, *tensors: torch.Tensor):
        n = tensors[0].shape[0]
        for start in range(0, n, self.batch_size):
            yield (t[start : start + self.batch_size] for t in tensors)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, trainer, pl_module) -> dict[str, float]:
        """Run one evaluation now and log it; returns the scalars."""
        mode = self._resolve_mode(pl_module)
        subset = self.fixed_subset(trainer)
        device = pl_module.device
        if self.extractor is None:
            self.extractor = build_extractor(self.extractor_spec, option="FIDMonitor.extractor")
        self.extractor.to(device)
        was_training = pl_module.training
        pl_module.eval()
        scope = getattr(pl_module, "ema_scope", contextlib.nullcontext)
        try:
            with scope():
                if mode == "rfid":
                    metrics, views = self._reconstruct(pl_module, subset, device)
                else:
                    metrics, views = self._generate(pl_module, subset, device)
        finally:
            pl_module.train(was_training)
        self._log(trainer, metrics, views, subset)
        self.last_metrics = metrics
        return metrics

    def _real_stats(self, images: torch.Tensor):
        return self.cache.stats(images, self.extractor, self.batch_size)

    def _reconstruct(self, pl_module, subset, device):
        images = subset["image"]
        latents, recs, feats = [], [], []
        for (x,) in self._chunks(images):
            z = pl_module.encode(x.to(device))
            rec = pl_module.decode(z).clamp(-1, 1)
            latents.append(z.float().cpu())
            recs.append(rec.float().cpu())
            feats.append(self.extractor(rec).cpu())
        rec = torch.cat(recs)
        mse = (rec - images.float()).square().flatten(1).mean(1).clamp_min(1e-12) / 4
        metrics = {
            "eval/rfid": frechet_distance(
                feature_stats(torch.cat(feats)), self._real_stats(images)
            ),
            "eval/psnr": float((-10 * torch.log10(mse)).mean()),
        }
        views = {
            "grid": torch.cat([images[: self.num_images], rec[: self.num_images]]),
            "latents": torch.cat(latents),
            "reference": subset.get("reference"),
            "reference_label": subset.get("reference_label", subset.get("label")),
        }
        return metrics, views

    def _generate(self, pl_module, subset, device):
        labels = subset.get("label")
        n = subset["image"].shape[0]
        if labels is None or int(pl_module.hparams.num_classes) == 0:
            labels = torch.full((n,), pl_module.dit.null_class, dtype=torch.long)
        decode = pl_module.tokenizer is not None
        latents, images, feats, real_latents = [], [], [], []
        for index, (y,) in enumerate(self._chunks(labels)):
            gen = torch.Generator().manual_seed(self.seed * 1000003 + index)
            z = pl_module.sample(
                y.to(device), steps=self.sample_steps, sampler=self.sampler, cfg=self.cfg,
                generator=gen,
            )  # fmt: skip
            latents.append(z.float().cpu())
            if decode:
                x = pl_module.decode(z).clamp(-1, 1)
                images.append(x.float().cpu())
                feats.append(self.extractor(x).cpu())
        for start in range(0, n, self.batch_size):
            chunk = {k: v[start : start + self.batch_size].to(device) for k, v in subset.items()}
            try:
                real_latents.append(pl_module.get_latents(chunk).float().cpu())
            except (KeyError, ValueError) as err:  # this data has no latents of its own
                if not self._warned_no_real_latents:
                    rank_zero_warn(
                        f"FIDMonitor: no latents of the evaluation images ({err!r}); the "
                        "real-latent histogram and projection are left out"
                    )
                    self._warned_no_real_latents = True
                real_latents = []
                break
        metrics: dict[str, float] = {}
        if decode:
            fake = feature_stats(torch.cat(feats))
            metrics["eval/gfid_proxy"] = frechet_distance(fake, self._real_stats(subset["image"]))
        views = {
            "grid": torch.cat(images)[: self.num_images] if images else None,
            "latents": torch.cat(latents),
            "latent_label": labels,
            "reference": torch.cat(real_latents) if real_latents else None,
            "reference_label": subset.get("label"),
        }
        return metrics, views

    # ------------------------------------------------------------------ logging
    def _log(self, trainer, metrics, views, subset) -> None:
        step = trainer.global_step
        for logger in trainer.loggers:
            if metrics:
                logger.log_metrics(metrics, step=step)
            experiment = getattr(logger, "experiment", None)
            if experiment is None or not hasattr(experiment, "add_image"):
                continue
            grid = views.get("grid")
            if grid is not None and self.num_images > 0 and grid.shape[0] > 0:
                image = torchvision.utils.make_grid(
                    grid, nrow=max(1, math.isqrt(self.num_images)), normalize=True,
                    value_range=(-1, 1),
                )  # fmt: skip
                experiment.add_image("eval/images", image, step)
            reference = views.get("reference")
            if self.histograms:
                experiment.add_histogram("eval/latents", views["latents"].flatten(), step)
                if reference is not None:
                    experiment.add_histogram("eval/reference", reference.flatten(), step)
            if self.projection is not None and reference is not None:
                labels = views.get("latent_label", subset.get("label"))
                figure = self.projection_figure(
                    views["latents"], labels, reference, views.get("reference_label")
                )
                experiment.add_figure(f"eval/{self.projection}", figure, step)

    def projection_figure(
        self,
        latents: torch.Tensor,
        labels: torch.Tensor | None,
        reference: torch.Tensor,
        reference_labels: torch.Tensor | None,
    ):
        """Matplotlib figure: latents and reference projected together (one basis), side by
        side, coloured by class."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        m = self.num_projected
        a, b = latents[:m].flatten(1), reference[:m].flatten(1)
        if a.shape[1] != b.shape[1]:
            raise ValueError(
                f"latents ({a.shape[1]} values) and reference ({b.shape[1]}) differ in size"
            )
        points = project_2d(torch.cat([a, b]), self.projection, self.seed)
        fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), sharex=True, sharey=True)
        for ax, pts, lab, title in (
            (axes[0], points[: len(a)], labels, "latents"),
            (axes[1], points[len(a) :], reference_labels, "reference"),
        ):
            colour = None if lab is None else lab[: len(pts)].numpy()
            ax.scatter(pts[:, 0], pts[:, 1], c=colour, cmap="tab10", s=6, vmin=0, vmax=9)
            ax.set_title(title)
        fig.suptitle(f"{self.projection.upper()} of latents vs reference, coloured by class")
        fig.tight_layout()
        return fig
