"""FIDMonitor in a real (tiny) fit: rFID of an identity tokenizer is 0, real statistics are
computed once and then read from the cache, TensorBoard receives scalars, image grids,
histograms and the PCA figure."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from test_eval import save_classifier_checkpoint
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dmvae_lightning.callbacks import FIDMonitor
from dmvae_lightning.callbacks.evaluation import project_2d


class Items(Dataset):
    def __init__(self, n: int) -> None:
        gen = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 1, 32, 32, generator=gen) * 2 - 1
        self.labels = torch.arange(n) % 10
        self.reference = torch.randn(n, 1, 32, 32, generator=gen) + self.labels[:, None, None, None]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "label": self.labels[i], "reference": self.reference[i]}


class Data(pl.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(Items(32), batch_size=8)

    def val_dataloader(self):
        return DataLoader(Items(40), batch_size=16)


class IdentityTokenizer(pl.LightningModule):
    """encode = decode = identity (times a trained scale that stays 1 with lr 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def encode(self, x):
        return x * self.scale

    def decode(self, z):
        return z / self.scale

    def training_step(self, batch, batch_idx):
        return (self.decode(self.encode(batch["image"])) - batch["image"]).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def fit(module: pl.LightningModule, monitor: FIDMonitor, max_steps: int, logger) -> None:
    """``max_steps`` training steps of ``module`` on :class:`Data` with ``monitor`` on."""
    trainer = pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=logger,
        callbacks=[monitor],
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, datamodule=Data())


def test_fid_monitor_logs_rfid_images_histograms_and_pca(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ckpt = save_classifier_checkpoint(tmp_path / "fid_net.ckpt", norm="group")
    monitor = FIDMonitor(
        extractor={"name": "domain", "checkpoint": str(ckpt)},
        every_n_batches=2,
        num_samples=24,
        batch_size=10,
        cache_dir=str(tmp_path / "cache"),
        num_images=4,
        num_projected=24,
    )
    logger = pl.loggers.TensorBoardLogger(tmp_path, name="tb", version=0)
    fit(IdentityTokenizer(), monitor, max_steps=4, logger=logger)
    assert monitor.cache.misses == 1 and monitor.cache.hits == 1  # 2 evaluations, 1 computation
    assert abs(monitor.last_metrics["eval/rfid"]) < 1e-6
    assert monitor.last_metrics["eval/psnr"] > 100
    assert monitor.subset["image"].shape == (24, 1, 32, 32)

    events = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    assert [e.step for e in events.Scalars("eval/rfid")] == [2, 4]
    assert {"eval/images", "eval/pca"} <= set(tags["images"])
    assert {"eval/latents", "eval/reference"} <= set(tags["histograms"])


class NegatingTokenizer(IdentityTokenizer):
    """Reconstructs every image negated, so rFID > 0 and PSNR has a closed form."""

    def decode(self, z):
        return -z / self.scale


def test_fid_monitor_rfid_and_psnr_are_those_of_the_decoded_reconstructions(tmp_path):
    """rFID and PSNR are computed on what ``decode`` returns: with reconstructions -x they
    equal the Frechet distance of the extractor's features of -x and x, and the PSNR of images
    in [-1, 1] (peak-to-peak 2) computed here by hand."""
    from dmvae_lightning.metrics import frechet_distance
    from dmvae_lightning.metrics.fid import feature_stats

    # group norm: an untrained net whose features tell images apart (batch norm's barely vary)
    ckpt = save_classifier_checkpoint(tmp_path / "fid_net.ckpt", norm="group")
    monitor = FIDMonitor(
        extractor={"name": "domain", "checkpoint": str(ckpt)},
        every_n_batches=2,
        num_samples=24,
        batch_size=24,
        cache_dir=str(tmp_path / "cache"),
    )
    fit(NegatingTokenizer(), monitor, max_steps=2, logger=False)
    x = monitor.subset["image"]
    rec = -x
    mse = (rec - x).square().flatten(1).mean(1)
    psnr = float((10 * torch.log10(4 / mse)).mean())
    with torch.no_grad():
        rfid = frechet_distance(
            feature_stats(monitor.extractor(rec)), feature_stats(monitor.extractor(x))
        )
    assert rfid > 0.05  # the reconstructions are not the images, and the features see it
    assert monitor.last_metrics["eval/rfid"] == pytest.approx(rfid, rel=1e-4)
    assert monitor.last_metrics["eval/psnr"] == pytest.approx(psnr, rel=1e-5)


def test_project_2d_pca_recovers_the_principal_plane():
    gen = torch.Generator().manual_seed(0)
    plane = torch.randn(200, 2, generator=gen) * torch.tensor([5.0, 2.0])
    basis = torch.linalg.qr(torch.randn(6, 6, generator=gen))[0][:, :2]
    # off the origin: the projection must centre the points, not only rotate them
    points = plane @ basis.T + 0.01 * torch.randn(200, 6, generator=gen) + 10.0
    projected = project_2d(points)
    assert projected.shape == (200, 2)
    # the projection keeps the in-plane variances (5^2, 2^2) up to the noise, is centred, and
    # keeps every distance between points of the plane (up to the out-of-plane noise)
    assert projected.var(0).tolist() == pytest.approx([25.0, 4.0], rel=0.25)
    assert projected.mean(0).abs().max() < 1e-4
    assert torch.allclose(torch.cdist(projected, projected), torch.cdist(plane, plane), atol=0.1)
    with pytest.raises(ValueError, match="projection"):
        project_2d(points, "umap")


def test_fid_monitor_gfid_proxy_on_a_diffusion_module_is_reproducible(tmp_path):
    from types import SimpleNamespace

    from test_eval import PixelShuffleTokenizer

    from dmvae_lightning.modules.diffusion import LatentDiffusionModule

    torch.manual_seed(0)
    module = LatentDiffusionModule(
        latent_shape=[4, 4, 4],
        num_classes=3,
        dit={"preset": "tiny", "patch_size": 2, "hidden_size": 16, "depth": 1, "num_heads": 2},
        latent_mean=0.0,
        latent_scale=1.0,
    )
    object.__setattr__(module, "_tokenizer", PixelShuffleTokenizer())
    ckpt = save_classifier_checkpoint(tmp_path / "fid_net.ckpt")
    monitor = FIDMonitor(
        {"name": "domain", "checkpoint": str(ckpt)},
        num_samples=12,
        batch_size=5,
        sample_steps=2,
        cache_dir=str(tmp_path / "cache"),
    )
    gen = torch.Generator().manual_seed(1)
    monitor.subset = {
        "image": torch.rand(12, 1, 8, 8, generator=gen) * 2 - 1,
        "label": torch.arange(12) % 3,
    }
    trainer = SimpleNamespace(loggers=[], global_step=0, datamodule=None)
    # the module reads latents from the batch (no tokenizer_ckpt), which these images do not
    # carry: the real-latent histogram is left out with one warning saying why
    with pytest.warns(UserWarning, match=r"no latents of the evaluation images .*input_key"):
        first = monitor.evaluate(trainer, module)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once, not at every evaluation
        second = monitor.evaluate(trainer, module)
    assert set(first) == {"eval/gfid_proxy"} and first["eval/gfid_proxy"] > 0
    assert first == second  # fixed noise, cached real statistics
    assert monitor.cache.misses == 1 and monitor.cache.hits == 1
    assert module.training  # train mode restored
