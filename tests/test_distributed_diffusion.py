"""Distributed correctness of LatentDiffusionModule on CPU with 2 processes (gloo, ``ddp_fork``),
in the harness style of test_distributed.py: the latent statistics measured before training
(``latent_mean`` / ``latent_scale``, summed over ranks) and the DiT and EMA weights after a few
steps are identical on both ranks and equal a single process on the same global batch.

Latents come from a reference source (no tokenizer): batches of the ``synthetic`` image set,
``encode_images`` false, tiny DiT (hidden 32, depth 1). Models and data modules are built in
Python; forked workers inherit them (and the test subclasses), so nothing is pickled.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from helpers import SaveRankState, forkable_threads
from test_distributed import assert_close, assert_equal, assert_moved

from dmvae_lightning import flow
from dmvae_lightning.data.reference import ReferenceDistribution
from dmvae_lightning.data.sources import Draw, GaussianSource, MixtureSource
from dmvae_lightning.modules.diffusion import LatentDiffusionModule

SHAPE = (4, 8, 8)
STEPS = 4
STATS_BATCHES = 2


class PerItemGaussian(GaussianSource):
    """``N(mean, std^2)`` latents that are a pure function of the training item (its index), not
    of the per-(step, rank) feed stream: an item gets the same latent whichever rank holds it,
    so 2 ranks x B and 1 process x 2B see the same global data."""

    name = "per_item_gaussian"

    def draw(self, request: Draw) -> tuple[torch.Tensor, None]:
        if request.indices is None:  # held-out feeds (unused here: no validation)
            return super().draw(request)
        rows = [
            torch.randn(self.shape, generator=torch.Generator().manual_seed(1000 + int(i)))
            for i in request.indices.tolist()
        ]
        return (self.mean + self.std * torch.stack(rows)).to(request.device), None


class FixedDrawsDiffusion(LatentDiffusionModule):
    """What differs per rank by design is switched off: the flow-matching ``t`` and noise (drawn
    per (seed, step, rank) by ``step_rng``) become pure functions of each sample, ``t =
    sigmoid(2 mean(x))`` and ``eps = cos(7 x + 1)`` (``sample_time`` is bypassed); label dropout
    is off (``class_dropout_prob = 0``); AdamW becomes plain SGD, so the update is linear in the
    all-reduced gradient (Adam's first steps are ``lr * sign(grad)``, which turns float noise in
    near-zero gradients into full-size steps)."""

    def training_loss(self, x, y):
        t = torch.sigmoid(2.0 * x.flatten(1).mean(1))
        eps = torch.cos(7.0 * x + 1.0)
        loss, _ = flow.velocity_loss(self.dit, x, y, t=t, eps=eps)
        return loss, {"train/loss": loss.detach()}

    def configure_optimizers(self):
        return torch.optim.SGD(self.dit.parameters(), lr=0.5)


class SaveMeasuredStats(SaveRankState):
    """Also writes every rank's ``latent_mean`` / ``latent_scale`` as measured, to
    ``<folder>/measured<R>.pt``: at the first batch start, after ``on_train_start`` measured them
    and before the first DDP forward, which broadcasts rank 0's buffers to every rank (the final
    states would agree across ranks even if each rank kept the statistics of its own shard)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 0 and batch_idx == 0:
            measured = (float(pl_module.latent_mean), float(pl_module.latent_scale))
            torch.save(measured, self.folder / f"measured{trainer.global_rank}.pt")


def build(module_cls, source, batch_size: int, lr: float = 1e-2, **model_kwargs):
    pl.seed_everything(0)  # same initial DiT in every run
    model = module_cls(
        latent_shape=list(SHAPE),
        num_classes=10,
        dit={"preset": "tiny", "patch_size": 4, "hidden_size": 32, "depth": 1, "num_heads": 2},
        encode_images=False,
        stats_batches=STATS_BATCHES,
        lr=lr,
        warmup_steps=1,
        ema_decay=0.9,
        num_log_images=0,
        **model_kwargs,
    )
    data = ReferenceDistribution(
        dataset="synthetic",
        image_size=8,
        channels=1,
        num_classes=10,
        batch_size=batch_size,
        num_workers=0,
        synthetic_size=64,
        seed=0,
        reference=source,
    )
    return model, data


def fit(root: Path, model, data, devices: int) -> list[dict]:
    """Fit ``STEPS`` batches on ``devices`` processes; every rank's final state."""
    root.mkdir(parents=True, exist_ok=True)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_fork" if devices > 1 else "auto",
        precision="32-true",
        max_epochs=1,
        limit_train_batches=STEPS,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        callbacks=[SaveMeasuredStats(root)],
    )
    with forkable_threads():
        trainer.fit(model, datamodule=data)
    return [torch.load(root / f"rank{r}.pt") for r in range(devices)]


def measured(root: Path, devices: int) -> list[tuple[float, float]]:
    """Every rank's statistics right after the statistics pass (before any DDP forward)."""
    return [torch.load(root / f"measured{r}.pt") for r in range(devices)]


def test_diffusion_ranks_identical_with_random_draws(tmp_path):
    """Everything random (GMM reference drawn per (step, rank), t / noise / label dropout per
    (seed, step, rank), AdamW): the measured statistics, every DiT weight, EMA and counter are
    bit-identical on the two ranks, and the DiT and its EMA moved."""
    gmm = MixtureSource(SHAPE, num_components=10, per_class=True, center_std=1.0, std=0.5)
    model, data = build(LatentDiffusionModule, gmm, 4, class_dropout_prob=0.5)
    ranks = fit(tmp_path, model, data, 2)
    assert_equal(ranks[0], ranks[1])
    assert int(ranks[0]["batch_count"]) == STEPS
    assert int(ranks[0]["ema.num_updates"]) == STEPS
    first, second = measured(tmp_path, 2)
    assert first == second, (first, second)
    assert (float(ranks[0]["latent_mean"]), float(ranks[0]["latent_scale"])) == first
    mean, scale = first
    # measured, not the defaults (0, 1): a GMM's draws give neither exactly
    assert abs(mean) < 0.5 and 0.5 < scale < 1.5, (mean, scale)
    assert mean != 0.0 and scale != 1.0, (mean, scale)
    assert_moved(tmp_path, ranks[0], ("dit.", "ema."))


def test_diffusion_equals_single_process(tmp_path):
    """2 ranks x 4 items == 1 process x 8 items, batch for batch (EpochShuffleSampler splits each
    global batch between the ranks): the statistics over the first 2 global batches agree to
    1e-6 relative (and with a direct computation over the same items), and the DiT and EMA after
    4 SGD steps are bit-identical on the ranks and within float tolerance of one process."""
    source = PerItemGaussian(SHAPE, mean=0.3, std=1.7)
    model, data = build(FixedDrawsDiffusion, source, 4, class_dropout_prob=0.0)
    ranks = fit(tmp_path / "ddp", model, data, 2)
    model, data = build(FixedDrawsDiffusion, source, 8, class_dropout_prob=0.0)
    (single,) = fit(tmp_path / "one", model, data, 1)

    assert_equal(ranks[0], ranks[1])
    assert int(single["batch_count"]) == STEPS

    # the statistics: over the items of the first STATS_BATCHES global batches of epoch 0
    order = list(iter(data._train_sampler))[: STATS_BATCHES * 8]
    z = source.draw(Draw(n=len(order), generator=torch.Generator(), indices=torch.tensor(order)))
    z = z[0].double()
    expected = (z.mean().item(), 1.0 / z.var(unbiased=False).sqrt().item())
    per_rank = measured(tmp_path / "ddp", 2)
    assert per_rank[0] == per_rank[1], per_rank
    for got in (*per_rank, *measured(tmp_path / "one", 1)):
        for value, want in zip(got, expected, strict=True):
            assert abs(value - want) <= 1e-6 * abs(want), (got, expected)

    assert_moved(tmp_path / "one", single, ("dit.", "ema."))
    assert_close(ranks[0], single, rtol=1e-4, atol=1e-5)
