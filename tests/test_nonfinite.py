"""The non-finite guard (model.init_args.nonfinite): stop or skip, never a non-finite checkpoint."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import checkpoints, run_ranks
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Dataset

from dmvae_lightning.cli import main
from dmvae_lightning.modules.diffusion import LatentDiffusionModule
from dmvae_lightning.modules.dmvae import DMVAEModule
from dmvae_lightning.nonfinite import NonFiniteError, NonFiniteGuard

CONFIGS = Path(__file__).resolve().parent / "configs"


def _nonfinite_tensors(path: Path) -> list[str]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return [
        k
        for k, v in ckpt["state_dict"].items()
        if v.is_floating_point() and not torch.isfinite(v).all()
    ]


def _lr_1e6(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(CONFIGS / "tokenizer_tiny.yaml"),
        "--model.init_args.lr",
        "1e6",
        "--model.init_args.grad_clip",
        "0",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.logger",
        "false",
        *extra,
    ]


def test_exploding_tokenizer_stops_naming_batch_and_terms(tmp_path, fashion_mnist_root):
    """lr 1e6 without clipping (the run that used to end with 186 of 188 tensors NaN): the
    default stop mode raises before the first non-finite step, naming the batch, the step and
    the loss terms, and leaves no non-finite checkpoint: with a checkpoint after every step,
    the one of step 1 (the last finite step) is written, finite, and named in the error."""
    every_step = [
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.every_n_train_steps=1",
        "--trainer.callbacks.save_top_k=-1",
        f"--trainer.callbacks.dirpath={tmp_path / 'every_step'}",
    ]
    with pytest.raises(NonFiniteError) as err:
        main(_lr_1e6(tmp_path, *every_step))
    message = str(err.value)
    assert message.startswith("batch 1, generator step: non-finite loss term(s)")
    assert "train/g_loss" in message
    assert "nonfinite.mode: skip" in message
    last = tmp_path / "every_step" / "epoch=0-step=1.ckpt"
    assert checkpoints(tmp_path) == [last]  # none of the failing step
    assert f"last good checkpoint: {last}" in message
    assert not _nonfinite_tensors(last)
    assert torch.load(last, weights_only=True)["global_step"] == 1


def test_exploding_tokenizer_skip_mode_finishes_finite(tmp_path, fashion_mnist_root):
    """Skip mode: the same run skips the non-finite steps, finishes, counts the skips in the
    checkpoint, and every checkpoint it wrote is finite."""
    main(_lr_1e6(tmp_path, "--model.init_args.nonfinite", "{mode: skip, max_skips: 100}"))
    written = checkpoints(tmp_path)
    assert written
    for path in written:
        assert not _nonfinite_tensors(path), path
    ckpt = torch.load(written[-1], map_location="cpu", weights_only=True)
    assert ckpt["nonfinite_skips"] >= 1


def test_skip_mode_stops_after_max_skips(tmp_path, fashion_mnist_root):
    with pytest.raises(NonFiniteError, match="max_skips=1"):
        main(_lr_1e6(tmp_path, "--model.init_args.nonfinite", "{mode: skip, max_skips: 1}"))


class _Points(Dataset):
    """2-D points as 2 x 1 x 1 latents; the item ``bad`` is NaN."""

    def __init__(self, n: int, bad: int) -> None:
        self.points = torch.randn(n, 2, generator=torch.Generator().manual_seed(0))
        self.points[bad] = float("nan")

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"reference": self.points[i].view(2, 1, 1)}


class _Snapshots(pl.Callback):
    """DiT weights after every training batch."""

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.weights.append({k: v.clone() for k, v in pl_module.dit.state_dict().items()})


def _diffusion_run(tmp_path: Path, mode: str) -> tuple[LatentDiffusionModule, _Snapshots]:
    pl.seed_everything(0)
    model = LatentDiffusionModule(
        latent_shape=[2, 1, 1],
        num_classes=0,
        dit={"preset": "tiny", "patch_size": 1, "hidden_size": 16, "depth": 1, "num_heads": 2},
        latent_mean=0.0,
        latent_scale=1.0,
        warmup_steps=0,
        ema_decay=0.9,
        nonfinite={"mode": mode},
    )
    snapshots = _Snapshots()
    trainer = pl.Trainer(
        max_steps=5,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1),
            snapshots,
        ],
    )
    # batch size 4, no shuffle: batch 3 holds the NaN item 13
    trainer.fit(model, DataLoader(_Points(40, bad=13), batch_size=4))
    return model, snapshots


def test_diffusion_stop_mode_names_batch_and_last_checkpoint(tmp_path):
    with pytest.raises(NonFiniteError) as err:
        _diffusion_run(tmp_path, "stop")
    message = str(err.value)
    assert message.startswith("batch 3, DiT step: non-finite loss term(s) train/loss")
    last = tmp_path / "epoch=0-step=3.ckpt"
    assert f"last good checkpoint: {last}" in message
    assert sorted(p.name for p in tmp_path.glob("*.ckpt"))[-1] == last.name


def test_diffusion_skip_mode_leaves_weights_and_counts(tmp_path):
    model, snapshots = _diffusion_run(tmp_path, "skip")
    assert model.nonfinite_guard.skips == 1
    before, after = snapshots.weights[2], snapshots.weights[3]  # around batch 3
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert any(not torch.equal(snapshots.weights[4][k], after[k]) for k in after)  # steps again
    for path in checkpoints(tmp_path):
        assert not _nonfinite_tensors(path), path
    ckpt = torch.load(checkpoints(tmp_path)[-1], weights_only=True)
    assert ckpt["nonfinite_skips"] == 1


def test_non_finite_weights_never_replace_a_checkpoint(tmp_path):
    """A checkpoint holding NaN is refused before the file is opened: the good file it would
    replace stays byte-identical, no new file appears."""
    model = LatentDiffusionModule(
        latent_shape=[2, 1, 1],
        num_classes=0,
        dit={"preset": "tiny", "patch_size": 1, "hidden_size": 16, "depth": 1, "num_heads": 2},
        latent_mean=0.0,
        latent_scale=1.0,
    )
    trainer = pl.Trainer(accelerator="cpu", logger=False, max_steps=0)
    trainer.strategy.connect(model)
    trainer.strategy._lightning_module = model
    model.trainer = trainer
    good = tmp_path / "last.ckpt"
    trainer.save_checkpoint(good)
    content = good.read_bytes()
    with torch.no_grad():
        next(model.dit.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(NonFiniteError, match="refusing to write a checkpoint: 1 of"):
        trainer.save_checkpoint(good)
    with pytest.raises(NonFiniteError):
        trainer.save_checkpoint(tmp_path / "new.ckpt")
    assert good.read_bytes() == content
    assert not (tmp_path / "new.ckpt").exists()


def test_guard_spec_is_checked():
    with pytest.raises(ValueError, match="model.init_args.nonfinite.mode"):
        NonFiniteGuard.from_spec({"mode": "ignore"})
    with pytest.raises(ValueError, match="unknown keys"):
        NonFiniteGuard.from_spec({"mod": "skip"})
    assert NonFiniteGuard.from_spec(None).mode == "stop"


class NaNDiscriminatorModule(DMVAEModule):
    """DMVAEModule whose discriminator loss is NaN from batch 2 on (its generator is fine)."""

    def discriminator_loss(self, x, x_rec):
        loss, logs = super().discriminator_loss(x, x_rec)
        if int(self.batch_count) >= 2:
            loss = loss * float("nan")
            logs["train/d_loss"] = loss.detach()
        return loss, logs


def _nan_discriminator_args(tmp_path: Path, mode: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(CONFIGS / "tokenizer_tiny.yaml"),
        "--model.class_path",
        f"{__name__}.NaNDiscriminatorModule",
        "--model.init_args.disc_start",
        "0",
        "--model.init_args.nonfinite",
        f"{{mode: {mode}, max_skips: 10}}",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.logger",
        "false",
    ]


def test_discriminator_step_is_guarded(tmp_path, fashion_mnist_root):
    """Stop mode names the discriminator step and the term; skip mode skips exactly the
    discriminator steps of batches 2..5 (its weights stay as after batch 1) while the
    generator keeps training."""
    with pytest.raises(NonFiniteError, match=r"^batch 2, discriminator step: .*train/d_loss"):
        main(_nan_discriminator_args(tmp_path / "stop", "stop"))
    cli = main(_nan_discriminator_args(tmp_path / "skip", "skip"))
    model = cli.model
    assert model.nonfinite_guard.skips == 4 and int(model.batch_count) == 6
    opt_g, opt_d = cli.trainer.optimizers
    steps = [{int(s["step"]) for s in opt.state.values()} for opt in (opt_g, opt_d)]
    assert steps == [{6}, {2}]
    for path in checkpoints(tmp_path / "skip"):
        assert not _nonfinite_tensors(path), path


def _rank_decisions(rank: int, world: int) -> dict:
    """Rank 0's gradient holds a NaN, rank 1's is finite (as a sharded gradient can be)."""
    net = torch.nn.Linear(2, 1)
    net.weight.grad = torch.tensor([[float("nan") if rank == 0 else 1.0, 0.0]])
    skip = NonFiniteGuard("skip").check_step(net, 7, "test", None, None, net.parameters())
    try:
        NonFiniteGuard("stop").check_step(net, 7, "test", None, None, net.parameters())
        stopped = ""
    except NonFiniteError as err:
        stopped = str(err)
    return {"stepped": skip, "stopped": stopped}


def test_ranks_take_the_same_decision(tmp_path):
    """2 ranks, a NaN gradient on rank 0 only: both skip (skip mode) and both stop (stop mode),
    rank 1 saying the problem is on another rank."""
    outs = run_ranks(_rank_decisions, tmp_path)
    assert [o["stepped"] for o in outs] == [False, False]
    assert "non-finite gradients in 1 parameter(s) (weight)" in outs[0]["stopped"]
    assert "on another rank" in outs[1]["stopped"]
