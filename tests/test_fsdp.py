"""FSDP2 (``trainer.strategy: fsdp2``) for LatentDiffusionModule on CPU with 2 processes (gloo):
the DiT and its EMA are really sharded, training equals one process on the doubled batch, the
EMA swap works on shards, full-state checkpoints load into a single process and resume exactly,
the validation sample grid and ``predict`` run on the sharded DiT, and without a device mesh
nothing is sharded.

Harness of test_distributed_diffusion.py (its model, data and sample-deterministic
``FixedDrawsDiffusion``); the 2-process runs use ``FSDP2Strategy(start_method="fork")``, so the
forked workers inherit the models, data and test classes and nothing is pickled. Each rank's state
is written as a full (gathered) state dict.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import forkable_threads
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from test_distributed import assert_close, assert_equal, assert_moved
from test_distributed_diffusion import SHAPE, FixedDrawsDiffusion, PerItemGaussian, build
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor, Shard

from dmvae_lightning.callbacks import FIDMonitor
from dmvae_lightning.modules.diffusion import LatentDiffusionModule
from dmvae_lightning.strategies import FSDP2Strategy, register_strategies


@pytest.fixture(autouse=True)
def _forkable():
    """Every test here forks workers (see helpers.forkable_threads)."""
    with forkable_threads():
        yield


WEIGHT = "dit.blocks.0.attn.qkv.weight"  # (3 x hidden 32, 32): 48 rows per rank
PROBE_T = (0.2, 0.5, 0.9)


def full_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict with every DTensor gathered (a collective under FSDP2: every
    rank must call it), as CPU copies."""
    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def probe_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.randn((3, *SHAPE), generator=torch.Generator().manual_seed(5))
    return x, torch.tensor(PROBE_T), torch.tensor([1, 2, 3])


def probe(module: LatentDiffusionModule) -> dict[str, torch.Tensor]:
    """DiT outputs on fixed inputs with the trained weights, inside ``ema_scope`` (EMA weights)
    and after it (trained weights again)."""
    x, t, y = (v.to(module.device) for v in probe_inputs())
    with torch.no_grad():
        before = module.dit(x, t, y).cpu()
        with module.ema_scope():
            inside = module.dit(x, t, y).cpu()
        after = module.dit(x, t, y).cpu()
    return {"before": before, "inside": inside, "after": after}


class RecordRank(pl.Callback):
    """Writes to ``folder``, per rank R: ``start<R>.pt`` / ``rank<R>.pt`` (full state at the start
    and the end of training), ``layout<R>.pt`` (for every DiT parameter and EMA buffer: DTensor?,
    placements, local and global shape; the data-parallel size) and ``probe<R>.pt``
    (:func:`probe` at the end; whether a second ``configure_model`` left the DiT and EMA
    tensors alone; whether FIDMonitor refuses the module), and ``predict<R>.pt`` (the first prediction batch's output).
    With ``perturb_rank1``, rank 1 adds noise to its DiT and EMA in
    ``setup``, i.e. before ``configure_model``."""

    def __init__(self, folder: Path, perturb_rank1: bool = False) -> None:
        self.folder = Path(folder)
        self.perturb_rank1 = perturb_rank1

    def _path(self, trainer, name: str) -> Path:
        return self.folder / f"{name}{trainer.global_rank}.pt"

    def setup(self, trainer, pl_module, stage) -> None:
        if self.perturb_rank1 and trainer.global_rank == 1:
            with torch.no_grad():
                for tensor in (*pl_module.dit.parameters(), *pl_module.ema.buffers()):
                    if tensor.is_floating_point():
                        tensor.add_(torch.randn_like(tensor))

    def on_train_start(self, trainer, pl_module) -> None:
        torch.save(full_state(pl_module), self._path(trainer, "start"))

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save(full_state(pl_module), self._path(trainer, "rank"))
        layout = {}
        tensors = dict(pl_module.dit.named_parameters(prefix="dit"))
        averages = pl_module.ema.named_buffers(prefix="ema")
        tensors.update((k, v) for k, v in averages if k != "ema.num_updates")
        for name, tensor in tensors.items():
            sharded = isinstance(tensor, DTensor)
            layout[name] = {
                "dtensor": sharded,
                "placements": tuple(tensor.placements) if sharded else None,
                "local": tuple(tensor.to_local().shape) if sharded else tuple(tensor.shape),
                "global": tuple(tensor.shape),
            }
        mesh = pl_module.device_mesh
        layout["data_parallel_size"] = mesh["data_parallel"].size() if mesh is not None else 1
        tensors_before = [*pl_module.dit.parameters(), *pl_module.ema.buffers()]
        pl_module.configure_model()  # as Lightning may call it again: must change nothing
        tensors_after = [*pl_module.dit.parameters(), *pl_module.ema.buffers()]
        layout["configure_model_again_no_op"] = all(
            a is b for a, b in zip(tensors_before, tensors_after, strict=True)
        )
        try:  # FIDMonitor samples on rank 0 alone: it must refuse a sharded DiT, not hang
            FIDMonitor(extractor="inception").on_fit_start(trainer, pl_module)
            layout["fid_monitor_refused"] = False
        except RuntimeError:
            layout["fid_monitor_refused"] = True
        torch.save(layout, self._path(trainer, "layout"))
        torch.save(probe(pl_module), self._path(trainer, "probe"))

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 0:
            torch.save({k: v.cpu() for k, v in outputs.items()}, self._path(trainer, "predict"))


def make_trainer(
    root: Path, devices: int, perturb_rank1: bool = False, sharded_ckpt: bool = False, **kwargs
) -> pl.Trainer:
    """Trainer on ``devices`` CPU processes (``FSDP2Strategy`` for 2, forked, collectives time
    out after 60 s instead of hanging) for epochs of 2 batches with one validation batch after
    each; ``kwargs`` override the Trainer arguments."""
    root.mkdir(parents=True, exist_ok=True)
    options = {
        "max_epochs": 1,
        "limit_train_batches": 2,
        "limit_val_batches": 1,
        "logger": False,
        "enable_checkpointing": False,
        **kwargs,
    }
    strategy = FSDP2Strategy(
        start_method="fork",
        timeout=timedelta(seconds=60),
        save_distributed_checkpoint=sharded_ckpt,
    )
    return pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy if devices > 1 else "auto",
        precision="32-true",
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        callbacks=[RecordRank(root, perturb_rank1=perturb_rank1)],
        **options,
    )


def fit(root: Path, model, data, devices: int, ckpt_path: str | None = None, **kwargs) -> list:
    """:func:`make_trainer` ``(root, devices, **kwargs)`` fits; every rank's final full state."""
    make_trainer(root, devices, **kwargs).fit(model, datamodule=data, ckpt_path=ckpt_path)
    return [torch.load(root / f"rank{r}.pt") for r in range(devices)]


def expected_probe(state: dict) -> dict[str, torch.Tensor]:
    """:func:`probe` of a single-process module holding ``state``."""
    model, _ = build(FixedDrawsDiffusion, PerItemGaussian(SHAPE), 4, class_dropout_prob=0.0)
    model.load_state_dict(state)
    return probe(model)


def test_fsdp2_equals_single_process_and_shards_the_dit(tmp_path):
    """2 ranks x 4 items under fsdp2 == 1 process x 8 items: the gathered DiT and EMA after 2
    epochs of 2 SGD steps (gradient clipping active, a validation with EMA weights after each
    epoch) are equal on the ranks and within 1e-4 of one process, although rank 1 started from
    perturbed weights (rank 0's are broadcast before sharding). During training every DiT
    parameter and EMA buffer is a DTensor sharded on dim 0 over a data-parallel mesh of 2: rank
    r holds rows [48 r, 48 r + 48) of the (96, 32) qkv weight. ``ema_scope`` swaps the EMA
    shards in and the trained ones back: the DiT's outputs before / inside / after it equal a
    single-process module with the gathered state."""
    source = PerItemGaussian(SHAPE, mean=0.3, std=1.7)
    clip = {"gradient_clip_val": 0.2}  # the gradient norms are about 0.3
    model, data = build(FixedDrawsDiffusion, source, 4, class_dropout_prob=0.0)
    ranks = fit(tmp_path / "fsdp", model, data, 2, max_epochs=2, perturb_rank1=True, **clip)
    model, data = build(FixedDrawsDiffusion, source, 8, class_dropout_prob=0.0)
    (single,) = fit(tmp_path / "one", model, data, 1, max_epochs=2, **clip)

    assert_equal(ranks[0], ranks[1])
    assert int(ranks[0]["batch_count"]) == int(single["batch_count"]) == 4
    assert int(ranks[0]["ema.num_updates"]) == 4
    assert_moved(tmp_path / "one", single, ("dit.", "ema."))
    assert_close(ranks[0], single, rtol=1e-4, atol=1e-5)

    for rank in range(2):
        layout = torch.load(tmp_path / "fsdp" / f"layout{rank}.pt")
        assert layout.pop("data_parallel_size") == 2
        assert layout.pop("fid_monitor_refused")
        assert layout.pop("configure_model_again_no_op")
        assert layout, "no DiT parameters recorded"
        for name, info in layout.items():
            assert info["dtensor"] and info["placements"] == (Shard(0),), name
        qkv = layout[WEIGHT]
        assert qkv["global"] == (96, 32) and qkv["local"] == (48, 32), qkv
        assert layout["ema.blocks__0__attn__qkv__weight"]["local"] == (48, 32)
        total = sum(info["local"][0] for info in layout.values() if info["global"])
        assert total < 0.6 * sum(info["global"][0] for info in layout.values() if info["global"])

    single_layout = torch.load(tmp_path / "one" / "layout0.pt")
    assert not single_layout["fid_monitor_refused"]
    assert not any(v["dtensor"] for v in single_layout.values() if isinstance(v, dict))

    want = expected_probe(ranks[0])
    for rank in range(2):
        got = torch.load(tmp_path / "fsdp" / f"probe{rank}.pt")
        for key in ("before", "inside", "after"):
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)
        assert (got["inside"] - got["before"]).abs().max() > 1e-3  # the EMA really differs


def test_fsdp2_checkpoint_loads_in_one_process_and_resumes_exactly(tmp_path):
    """AdamW and random draws (t, noise, label dropout per step and rank) under fsdp2: the
    full-state checkpoint written after epoch 1 is one file whose ``load_from_checkpoint`` in a
    plain single process has exactly the gathered weights, EMA and counters of that run, and
    resuming from it under fsdp2 for a second epoch is bit-identical to 2 epochs straight
    (weights, EMA, AdamW state restored from the gathered file). The blocks keep their gathered
    weights from forward to backward here (``fsdp_reshard_after_forward=False``)."""
    source = PerItemGaussian(SHAPE, mean=0.3, std=1.7)
    options = {"class_dropout_prob": 0.5, "fsdp_reshard_after_forward": False}
    model, data = build(LatentDiffusionModule, source, 4, **options)
    (straight, _) = fit(tmp_path / "straight", model, data, 2, max_epochs=2)

    model, data = build(LatentDiffusionModule, source, 4, **options)
    (first, _) = fit(tmp_path / "first", model, data, 2, max_epochs=1, enable_checkpointing=True)
    (ckpt,) = (tmp_path / "first" / "checkpoints").glob("*.ckpt")
    assert ckpt.is_file()
    plain = LatentDiffusionModule.load_from_checkpoint(ckpt, map_location="cpu")
    assert not any(isinstance(p, DTensor) for p in plain.parameters())
    assert_equal(plain.state_dict(), first)
    assert int(plain.batch_count) == 2 and bool(plain.stats_ready)

    model, data = build(LatentDiffusionModule, source, 4, **options)
    (resumed, _) = fit(tmp_path / "resumed", model, data, 2, max_epochs=2, ckpt_path=str(ckpt))
    assert int(resumed["batch_count"]) == 4
    assert_moved(tmp_path / "straight", straight, ("dit.", "ema."))
    assert_equal(resumed, straight)


def test_fsdp2_sharded_checkpoint_resumes_exactly(tmp_path):
    """``save_distributed_checkpoint=True``: the checkpoint after epoch 1 is a folder of
    per-rank shards (no gathering on rank 0), and resuming from it under fsdp2 with the same
    world size is bit-identical to 2 epochs straight (weights, EMA, AdamW state, counters)."""
    source = PerItemGaussian(SHAPE, mean=0.3, std=1.7)
    options = {"class_dropout_prob": 0.5}
    model, data = build(LatentDiffusionModule, source, 4, **options)
    (straight, _) = fit(tmp_path / "straight", model, data, 2, max_epochs=2)

    model, data = build(LatentDiffusionModule, source, 4, **options)
    fit(
        tmp_path / "first",
        model,
        data,
        2,
        max_epochs=1,
        enable_checkpointing=True,
        sharded_ckpt=True,
    )
    (ckpt,) = (tmp_path / "first" / "checkpoints").glob("*.ckpt")
    assert ckpt.is_dir() and len(list(ckpt.glob("*.distcp"))) == 2, sorted(ckpt.iterdir())

    model, data = build(LatentDiffusionModule, source, 4, **options)
    (resumed, _) = fit(
        tmp_path / "resumed", model, data, 2, max_epochs=2, ckpt_path=str(ckpt), sharded_ckpt=True
    )
    assert int(resumed["batch_count"]) == 4
    assert_moved(tmp_path / "straight", straight, ("dit.", "ema."))
    assert_equal(resumed, straight)


class PixelTokenizer(torch.nn.Module):
    """Stand-in for a frozen tokenizer: decodes a latent to a 1-channel image (its first
    channel, squashed to [-1, 1]); it has a (frozen) parameter, as a real one would."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = torch.nn.Parameter(torch.ones(()), requires_grad=False)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.gain * z[:, :1])


class DecodingDiffusion(LatentDiffusionModule):
    """Trains on the reference latents and decodes samples with :class:`PixelTokenizer`."""

    def load_tokenizer(self, path: str) -> torch.nn.Module:
        return PixelTokenizer()


def test_fsdp2_sample_grid_predict_and_weights_handed_back(tmp_path):
    """Under fsdp2 the validation sample grid (every rank samples with the sharded EMA DiT,
    rank 0 logs it) reaches TensorBoard, the forked fit hands the full trained state back to
    the calling process's (unsharded) module, and ``predict`` (EMA, sharded) returns the
    samples a single process draws with that state for the same labels and seed."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dmvae_lightning.utils.rng import step_seed

    source = PerItemGaussian(SHAPE, mean=0.3, std=1.7)
    model, data = build(
        DecodingDiffusion,
        source,
        4,
        tokenizer_ckpt="stand-in",
        log_sample_steps=2,
        sample_steps=3,
    )
    model.hparams.num_log_images = 4  # build() sets 0; the grid is what this test is about
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb", version=0)
    trainer = make_trainer(tmp_path, 2, logger=logger, limit_predict_batches=1)
    trainer.fit(model, datamodule=data)
    (final, _) = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert_equal(model.state_dict(), final)
    assert not any(isinstance(p, DTensor) for p in model.parameters())

    events = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"images": 0})
    assert "val/samples" in events.Reload().Tags()["images"]

    trainer.predict(model, datamodule=data)  # forked: the outputs come back as files
    plain, _ = build(DecodingDiffusion, source, 4, tokenizer_ckpt="stand-in", sample_steps=3)
    plain.load_state_dict(final)
    for rank in range(2):
        out = torch.load(tmp_path / f"predict{rank}.pt")
        assert out["image"].shape == (4, 1, 8, 8) and out["latent"].shape == (4, *SHAPE)
        gen = torch.Generator().manual_seed(step_seed(plain.hparams.seed, 0, rank))
        want = plain.sample(out["label"], generator=gen)
        torch.testing.assert_close(out["latent"], want, rtol=1e-5, atol=1e-5)
        assert out["latent"].abs().max() > 0.1


def test_configure_model_without_mesh_is_a_no_op():
    """One process (no device mesh): ``configure_model`` leaves the DiT and EMA plain tensors,
    unchanged, also when called twice."""
    model, _ = build(LatentDiffusionModule, PerItemGaussian(SHAPE), 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.configure_model()
    model.configure_model()
    assert model.device_mesh is None and not model.dit_is_sharded
    assert not any(isinstance(t, DTensor) for t in (*model.parameters(), *model.buffers()))
    assert_equal(model.state_dict(), before)


def test_fsdp2_name_is_registered_with_world_size_data_parallel():
    """``trainer.strategy: fsdp2`` is FSDP2Strategy; its data-parallel size is the world size
    (2 nodes x 2 devices -> (4, 1)), where ModelParallelStrategy's own "auto" would take the
    number of nodes. ``register_strategies`` is idempotent."""
    register_strategies()
    register_strategies()
    assert StrategyRegistry["fsdp2"]["strategy"] is FSDP2Strategy
    trainer = pl.Trainer(accelerator="cpu", devices=2, num_nodes=2, strategy="fsdp2", logger=False)
    assert isinstance(trainer.strategy, FSDP2Strategy)
    assert isinstance(trainer.strategy, ModelParallelStrategy)
    assert trainer.strategy.parallel_sizes() == (4, 1)
    assert trainer.world_size == 4
    assert trainer.strategy._save_distributed_checkpoint is False
    with pytest.raises(ValueError, match="start_method"):
        FSDP2Strategy(start_method="thread")
