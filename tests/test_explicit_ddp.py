"""ExplicitDDPStrategy (``ddp_explicit``) and its collectives, on CPU with 2 forked processes
(gloo): closed-form gradient averages (with gradients missing on some or all ranks, several
buckets and dtypes), the broadcast of normalisation statistics, gradient accumulation syncing
only on the stepping batch, and the refused DDP-wrapper options. The DMVAE stages under this
strategy are in test_distributed.py."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import SaveRankState, forkable_threads, run_ranks
from lightning.pytorch.strategies import StrategyRegistry
from torch import nn

from dmvae_lightning.distributed import (
    ExplicitDDPStrategy,
    all_reduce_gradients,
    broadcast_tensors,
    norm_statistics,
)


def _gradients(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    a = nn.Parameter(torch.zeros(3, 4))  # gradient r + 1 everywhere on rank r
    b = nn.Parameter(torch.zeros(5, dtype=torch.float64))  # fp64: a bucket of its own
    c = nn.Parameter(torch.zeros(2))  # gradient on rank 1 only
    d = nn.Parameter(torch.zeros(2))  # no gradient anywhere
    e = nn.Parameter(torch.zeros(7), requires_grad=False)  # frozen: never sent
    a.grad = torch.full_like(a, rank + 1.0)
    b.grad = torch.arange(5, dtype=torch.float64) * (rank + 1)
    if rank == 1:
        c.grad = torch.tensor([4.0, -6.0])
    # 16-byte buckets: `a` (48 bytes) alone, then b (fp64), then c
    n = all_reduce_gradients([a, b, c, d, e], bucket_cap_mb=16 / 2**20)
    return {"a": a.grad, "b": b.grad, "c": c.grad, "d": d.grad, "e": e.grad, "n": n}


def test_all_reduce_gradients_closed_form(tmp_path):
    """Mean over ranks of (r + 1) is 1.5; fp64 stays fp64; a gradient present on one rank of two
    becomes half of it on both (zeros elsewhere, as DDP); unused everywhere stays None; frozen is
    not sent; the count is of the elements all-reduced (12 + 5 + 2)."""
    for out in run_ranks(_gradients, tmp_path):
        torch.testing.assert_close(out["a"], torch.full((3, 4), 1.5))
        assert out["b"].dtype == torch.float64
        torch.testing.assert_close(out["b"], torch.arange(5, dtype=torch.float64) * 1.5)
        torch.testing.assert_close(out["c"], torch.tensor([2.0, -3.0]))
        assert out["d"] is None and out["e"] is None
        assert out["n"] == 19


def _norm_stats(rank: int, world: int) -> dict:
    torch.manual_seed(rank)  # different running statistics per rank
    image = nn.Sequential(nn.Conv2d(1, 3, 1), nn.BatchNorm2d(3), nn.GroupNorm(1, 3))
    net = nn.ModuleList([image, nn.BatchNorm1d(2)])
    image(torch.randn(4, 1, 2, 2) * (rank + 1))
    net[1](torch.randn(4, 2) + rank)
    before = [b.clone() for b in norm_statistics(net)]
    broadcast_tensors(norm_statistics(net))
    return {"before": before, "after": norm_statistics(net)}


def test_broadcast_norm_statistics(tmp_path):
    """Both BatchNorm layers' running mean / var / count (GroupNorm has none) end equal to rank
    0's, which differed from rank 1's before."""
    first, second = run_ranks(_norm_stats, tmp_path)
    assert len(first["after"]) == 6
    assert not torch.equal(first["before"][0], second["before"][0])
    for r0_before, r0_after, r1_after in zip(
        first["before"], first["after"], second["after"], strict=True
    ):
        assert torch.equal(r0_after, r0_before) and torch.equal(r1_after, r0_before)


class Regression(pl.LightningModule):
    """Linear regression on fixed data, plain SGD: its update is linear in the gradient."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return (self.net(x) - y).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class RegressionData(pl.LightningDataModule):
    """32 rows of a noiseless linear map; ranks take interleaved rows, in order (no shuffle)."""

    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        g = torch.Generator().manual_seed(1)
        x = torch.randn(32, 4, generator=g)
        y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1
        self.dataset = torch.utils.data.TensorDataset(x, y)

    def train_dataloader(self):
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = torch.utils.data.DistributedSampler(
            self.dataset, num_replicas=world, rank=rank, shuffle=False
        )
        return torch.utils.data.DataLoader(self.dataset, self.batch_size, sampler=sampler)


def _fit(folder: Path, devices: int, batch_size: int, strategy, accumulate: int) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_epochs=1,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[SaveRankState(folder)],
    )
    with forkable_threads():
        trainer.fit(Regression(), datamodule=RegressionData(batch_size))
    return [
        (torch.load(folder / f"rank{r}.pt"), torch.load(folder / f"comm{r}.pt"))
        for r in range(devices)
    ]


def test_gradient_accumulation_syncs_on_the_stepping_batch_only(tmp_path):
    """Automatic optimisation, accumulate 2 batches: 2 ranks x 4 rows == 1 process x 8 rows
    (each global batch is the same 8 rows), and only the 2 stepping
    backwards of the 4 are synced (2 x 5 elements)."""
    ranks = _fit(tmp_path / "ddp", 2, 4, "ddp_explicit_fork", 2)
    (single,) = _fit(tmp_path / "one", 1, 8, "auto", 2)
    for state, stats in ranks:
        assert stats == {"backwards": 2, "elements": 10}
        for k in single[0]:
            torch.testing.assert_close(state[k], single[0][k], rtol=1e-5, atol=1e-6)
    assert not torch.equal(single[0]["net.weight"], Regression().net.weight.detach())


def test_strategy_registered_and_wrapper_options_refused():
    """The three start methods are registered; DDP-wrapper options are errors, not ignored."""
    for name in ("ddp_explicit", "ddp_explicit_spawn", "ddp_explicit_fork"):
        assert StrategyRegistry[name]["strategy"] is ExplicitDDPStrategy
    assert StrategyRegistry["ddp_explicit_fork"]["init_params"]["start_method"] == "fork"
    with pytest.raises(ValueError, match="find_unused_parameters"):
        ExplicitDDPStrategy(find_unused_parameters=True)
    with pytest.raises(ValueError, match="ddp_comm_hook"):
        ExplicitDDPStrategy(ddp_comm_hook=lambda state, bucket: None)
