"""Distributed correctness on CPU with 2 processes (gloo): the alignment step (stage 3: VAE +
DMD + fake score model) and the stage-1 generator step leave identical weights on both ranks and
equal a single-process run on the same global batch; SLURM variables are picked up, a mismatch
between tasks and devices is a clear error; a requeue signal writes a checkpoint that the next run
resumes from.

The 2-process runs use ``ddp_explicit_fork`` (:class:`~dmvae_lightning.distributed.ExplicitDDPStrategy`,
the strategy DMVAEModule is meant for: no DDP wrapper, explicit gradient averaging) and, for
comparison, Lightning's DDP wrapper with ``find_unused_parameters=True``, both with
``start_method="fork"`` (gloo on CPU): forked workers inherit this test's patches, and no trainer
has to be pickled.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import SaveAtBatch, SaveRankState, forkable_threads

from dmvae_lightning import flow
from dmvae_lightning.cli import main
from dmvae_lightning.losses.matching import DMDLoss

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "tests" / "configs"
QUIET = ["--trainer.logger", "false", "--trainer.enable_checkpointing", "false"]


def align_args(ckpts: dict[str, str], *extra: str) -> list[str]:
    return [
        "--config",
        str(CONFIGS / "align_tiny.yaml"),
        "--model.init_args.init_from",
        ckpts["tokenizer"],
        "--model.init_args.matching_loss.init_args.real_model",
        ckpts["reference"],
        "--model.init_args.vae_every",
        "2",
        "--trainer.limit_train_batches",
        "4",
        "--trainer.limit_val_batches",
        "0",
        *extra,
    ]


def run(
    root: Path,
    args: list[str],
    devices: int,
    batch_size: int,
    strategy: str,
    *callbacks,
    ckpt_path: Path | None = None,
) -> list[dict]:
    """Fit with ``devices`` processes and per-rank ``batch_size`` (and extra ``callbacks``,
    resuming from ``ckpt_path``); every rank's final state."""
    root.mkdir(parents=True, exist_ok=True)
    cli = main(
        [
            *args,
            *QUIET,
            "--trainer.default_root_dir",
            str(root),
            "--trainer.devices",
            str(devices),
            "--trainer.strategy",
            strategy,
            "--data.init_args.batch_size",
            str(batch_size),
        ],
        run=False,
    )
    cli.trainer.callbacks.extend([SaveRankState(root), *callbacks])
    with forkable_threads():
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    return [torch.load(root / f"rank{r}.pt") for r in range(devices)]


def assert_close(a: dict, b: dict, rtol: float, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(
                a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}"
            )
        else:
            assert torch.equal(a[k], b[k]), k


def assert_moved(folder: Path, end: dict, prefixes: tuple[str, ...]) -> None:
    """Every network named by ``prefixes`` moved far beyond the comparison tolerance."""
    start = torch.load(folder / "start0.pt")
    for prefix in prefixes:
        keys = [k for k in end if k.startswith(prefix) and end[k].is_floating_point()]
        assert keys, prefix
        moved = max((end[k] - start[k]).abs().max().item() for k in keys)
        assert moved > 1e-3, f"{prefix} moved only {moved}"


def assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"ranks differ at {bad[:5]} (+{max(0, len(bad) - 5)})"


DDP = "ddp_explicit_fork"
DDP_WRAPPER = "ddp_fork_find_unused_parameters_true"


@pytest.fixture
def deterministic_draws(monkeypatch):
    """For the comparison with one process, AdamW becomes plain SGD (lr x 20): the update is then
    linear in the all-reduced gradient, which is what DDP must get right (Adam's first steps
    are ``lr * sign(grad)``, which turns float noise in near-zero gradients, e.g. of conv biases
    followed by GroupNorm, into full-size steps). And replace the per-(seed, step, rank) random draws of the DMD losses by pure functions of
    each sample, so that a sample gets the same t and noise whichever rank holds it: DMD's
    ``t`` is the middle of its range and its noise ``sin(7 z + 1)``; the fake model's flow-matching
    loss uses ``t = 0.6`` and noise ``cos(7 z + 1)``."""

    def draw(self, z, step, t, eps):
        lo, hi = self.t_range(step)
        t = torch.full((z.shape[0],), 0.5 * (lo + hi), device=z.device)
        return t, torch.sin(7.0 * z.detach().float() + 1.0), lo, hi

    original = flow.velocity_loss

    def velocity_loss(model_fn, x1, y=None, t=None, eps=None, **kwargs):
        noise = torch.cos(7.0 * x1.detach().float() + 1.0)
        return original(model_fn, x1, y, 0.6, noise, **kwargs)

    def sgd(params, lr, betas=None, weight_decay=0.0):
        return torch.optim.SGD(params, lr=20 * lr, weight_decay=weight_decay)

    monkeypatch.setattr(torch.optim, "AdamW", sgd)
    monkeypatch.setattr(DMDLoss, "_draw", draw)
    monkeypatch.setattr(flow, "velocity_loss", velocity_loss)


# What differs per rank by design and is switched off for the comparison with one process:
# DiffAugment and bCR (random per rank; diffaug "", consistency_weight 0) and the fake model's
# label dropout (random per rank). The adaptive GAN weight stays on: it is computed from
# gradients averaged over the ranks, i.e. it is the global batch's.
LINEAR = [
    "--model.init_args.diffaug",
    "",
    "--model.init_args.consistency_weight",
    "0",
]


class RecordDraws(pl.Callback):
    """Records the DMD timesteps and noise each rank draws (through a wrapped ``DMDLoss._draw``)
    and writes them to ``<folder>/draws<R>.pt`` at the end of training."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def on_train_start(self, trainer, pl_module) -> None:
        loss = pl_module.matching_loss
        original, self.draws = loss._draw, []

        def draw(*args, **kwargs):
            t, eps, lo, hi = original(*args, **kwargs)
            self.draws.append((t.detach().cpu().clone(), eps.detach().cpu().clone()))
            return t, eps, lo, hi

        loss._draw = draw

    def on_train_end(self, trainer, pl_module) -> None:
        del pl_module.matching_loss._draw
        torch.save(self.draws, self.folder / f"draws{trainer.global_rank}.pt")


def test_align_step_ranks_identical_with_random_draws(tmp_path, stage_ckpts):
    """Stage 3 with everything random (DiffAug, bCR, DMD t / noise seeded per rank, GAN from
    batch 0): after 4 batches (2 VAE steps, 4 fake-model steps) every weight, buffer, EMA and
    counter is bit-identical on the two ranks. Each backward all-reduced only its own optimizer's
    gradients: the fake model's on all 4 batches, the tokenizer's and the discriminator's on the
    2 VAE batches (8 backwards; a DDP wrapper would send all three networks each time). The
    per-rank random streams are distinct: the two ranks drew different DMD timesteps and noise
    (the same draws on both ranks would correlate the halves of the global batch)."""
    ranks = run(tmp_path, align_args(stage_ckpts), 2, 8, DDP, RecordDraws(tmp_path))
    assert_equal(ranks[0], ranks[1])
    assert int(ranks[0]["batch_count"]) == 4
    assert int(ranks[0]["matching_loss.num_steps"]) == 2

    def numel(prefix: str) -> int:
        return sum(v.numel() for k, v in ranks[0].items() if k.startswith(prefix))

    fake, disc = numel("matching_loss.fake."), numel("discriminator.")
    tokenizer = numel("tokenizer.")
    assert fake > 0 and disc > 0 and tokenizer > 0
    for r in range(2):
        comm = torch.load(tmp_path / f"comm{r}.pt")
        assert comm == {"backwards": 8, "elements": 4 * fake + 2 * (tokenizer + disc)}, comm

    draws = [torch.load(tmp_path / f"draws{r}.pt") for r in range(2)]
    assert len(draws[0]) == len(draws[1]) == 2  # one DMD evaluation per VAE step
    for (t0, eps0), (t1, eps1) in zip(*draws, strict=True):
        assert t0.shape == t1.shape == (8,)
        assert not torch.allclose(t0, t1) and not torch.allclose(eps0, eps1)


@pytest.mark.parametrize("strategy", [DDP, DDP_WRAPPER])
def test_align_step_equals_single_process(tmp_path, stage_ckpts, deterministic_draws, strategy):
    """2 ranks x 8 images == 1 process x 16 images, batch for batch (the distributed sampler
    splits each global batch of the shared shuffle between the ranks): generator (with GAN and
    DMD), discriminator and fake model end within float tolerance of the single-process run,
    with the explicit gradient sync and with the DDP wrapper."""
    args = align_args(
        stage_ckpts, *LINEAR, "--model.init_args.matching_loss.init_args.fake_label_dropout", "0"
    )
    ranks = run(tmp_path / "ddp", args, 2, 8, strategy)
    (single,) = run(tmp_path / "one", args, 1, 16, "auto")
    assert_equal(ranks[0], ranks[1])
    assert_moved(tmp_path / "one", single, ("tokenizer.", "discriminator.", "matching_loss.fake."))
    assert_close(ranks[0], single, rtol=1e-4, atol=1e-5)


def test_generator_step_equals_single_process(tmp_path, fashion_mnist_root, deterministic_draws):
    """Stage 1 (generator + discriminator from batch 2): identical on both ranks and equal to
    one process on the doubled batch."""
    args = [
        "--config",
        str(CONFIGS / "tokenizer_tiny.yaml"),
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "4",
        "--trainer.limit_val_batches",
        "0",
        "--model.init_args.disc_start",
        "2",
        *LINEAR,
    ]
    ranks = run(tmp_path / "ddp", args, 2, 8, DDP)
    (single,) = run(tmp_path / "one", args, 1, 16, "auto")
    assert_equal(ranks[0], ranks[1])
    assert int(single["batch_count"]) == 4
    assert_moved(tmp_path / "one", single, ("tokenizer.", "discriminator."))
    assert_close(ranks[0], single, rtol=1e-4, atol=1e-5)


def test_batchnorm_discriminator_statistics_follow_rank_0(
    tmp_path, fashion_mnist_root, monkeypatch
):
    """Stage 1 with a BatchNorm discriminator: each rank normalises its own batch, and the
    running statistics, which differ per rank after every step, are broadcast from rank 0, so
    all weights and buffers end bit-identical; the statistics did move."""
    args = [
        "--config",
        str(CONFIGS / "tokenizer_tiny.yaml"),
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "3",
        "--trainer.limit_val_batches",
        "0",
        "--model.init_args.disc_start",
        "1",
        "--model.init_args.discriminator.norm",
        "batch",
    ]
    ranks = run(tmp_path, args, 2, 8, DDP)
    assert_equal(ranks[0], ranks[1])
    counts = [k for k in ranks[0] if k.endswith("num_batches_tracked")]
    assert counts and all(int(ranks[0][k]) > 0 for k in counts)
    # the same run without the broadcast: each rank keeps its own statistics. Rank 0's equal
    # the broadcast run's (the source was rank 0), rank 1's do not; training-mode BatchNorm
    # never reads them, so the weights are the same in both runs
    import dmvae_lightning.distributed as distributed

    monkeypatch.setattr(distributed, "norm_statistics", lambda model: [])
    apart = run(tmp_path / "no_broadcast", args, 2, 8, DDP)
    stats = [k for k in ranks[0] if k.startswith("discriminator.") and "running_" in k]
    assert stats and any(ranks[0][k].abs().max() > 1e-3 for k in stats if "mean" in k)
    for k in stats:
        assert torch.equal(apart[0][k], ranks[0][k]), k
    assert any(not torch.equal(apart[1][k], ranks[0][k]) for k in stats)
    weights = [k for k in ranks[0] if k.startswith("discriminator.") and k.endswith("weight")]
    assert weights and all(torch.equal(apart[0][k], ranks[0][k]) for k in weights)


def test_align_resumes_mid_epoch_across_ranks(tmp_path, stage_ckpts):
    """2 ranks, alignment with every random draw on: a checkpoint written after batch 2 of the
    4-batch epoch, resumed on 2 ranks, ends bit-identical to the uninterrupted run (weights,
    EMA, fake model, counters): each rank continues its own half of the same global batches, and
    the per-(step, rank) draws repeat."""
    args = align_args(stage_ckpts)
    mid = tmp_path / "mid.ckpt"
    full = run(tmp_path / "full", args, 2, 8, DDP, SaveAtBatch(2, mid))
    assert int(torch.load(mid, weights_only=False)["state_dict"]["batch_count"]) == 2
    resumed = run(tmp_path / "resumed", args, 2, 8, DDP, ckpt_path=mid)
    start = torch.load(tmp_path / "resumed" / "start0.pt")
    assert int(start["batch_count"]) == 2
    assert_equal(resumed[0], resumed[1])
    assert_equal(full[0], resumed[0])


class SaveValidationMetrics(pl.Callback):
    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def on_validation_end(self, trainer, pl_module) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        torch.save(metrics, self.folder / f"val{trainer.global_rank}.pt")


def validate(root: Path, devices: int, val_batch_size: int) -> list[dict]:
    """``validate`` the (seeded, untrained) stage-1 tokenizer on the 32 validation images with
    ``devices`` processes; every rank's logged metrics."""
    root.mkdir(parents=True, exist_ok=True)
    cli = main(
        [
            "--config",
            str(CONFIGS / "tokenizer_tiny.yaml"),
            *QUIET,
            "--trainer.default_root_dir",
            str(root),
            "--trainer.devices",
            str(devices),
            "--trainer.strategy",
            DDP if devices > 1 else "auto",
            "--data.init_args.val_batch_size",
            str(val_batch_size),
        ],
        run=False,
    )
    cli.trainer.callbacks.append(SaveValidationMetrics(root))
    with forkable_threads():
        cli.trainer.validate(cli.model, datamodule=cli.datamodule)
    return [torch.load(root / f"val{r}.pt") for r in range(devices)]


def test_validation_metrics_are_synced_over_ranks(tmp_path, fashion_mnist_root):
    """PSNR, SSIM (torchmetrics states summed over ranks) and the reconstruction loss
    (``sync_dist``) of 2 ranks x 16 validation images equal one process on all 32, on every
    rank; a rank's own half alone gives a different value."""
    ranks = validate(tmp_path / "ddp", 2, 8)
    (single,) = validate(tmp_path / "one", 1, 16)
    keys = ("val/psnr", "val/ssim", "val/rec_loss")
    for metrics in ranks:
        for k in keys:
            assert abs(metrics[k] - single[k]) <= 1e-5 * abs(single[k]), (k, metrics, single)
    (half,) = validate(tmp_path / "half", 1, 8)  # first 16 images only (2 batches of 8)
    # limit_val_batches 2 of the config: one process with batch 8 sees images 0-15 only
    assert abs(half["val/psnr"] - single["val/psnr"]) > 1e-3


def test_ddp_without_find_unused_parameters_is_a_clear_error(tmp_path, stage_ckpts):
    """A plain DDP wrapper cannot work with one backward per optimizer (it would fail at the
    second batch with "Expected to have finished reduction"): DMVAEModule refuses it in
    ``setup`` and names the strategy to use."""
    with pytest.raises(Exception, match="ddp_explicit"):
        run(tmp_path, align_args(stage_ckpts), 2, 8, "ddp_fork")
    assert not (tmp_path / "rank0.pt").exists()
