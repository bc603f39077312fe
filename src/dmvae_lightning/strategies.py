"""Named training strategies of this package: ``trainer.strategy: fsdp2`` (below) and
``ddp_explicit`` / ``ddp_explicit_spawn`` / ``ddp_explicit_fork``
(:class:`~dmvae_lightning.distributed.ExplicitDDPStrategy`, for the tokenizer stages).

``fsdp2`` is :class:`FSDP2Strategy`, Lightning's ``ModelParallelStrategy`` (FSDP2, PyTorch's
``fully_shard``) set up for pure data parallelism: every process of every node is one
data-parallel rank, no tensor parallelism, and checkpoints are single files with the full
(gathered) state. The LightningModule decides what is sharded, in its ``configure_model()``:
:class:`~dmvae_lightning.modules.diffusion.LatentDiffusionModule` shards its DiT (weights,
gradients, optimizer state and the DiT's EMA); modules without ``configure_model()`` (e.g. the
tokenizer stages) are refused by Lightning. Use it from YAML or the command line::

    dmvae fit --config configs/imagenet/diffusion.yaml --trainer.strategy fsdp2
    STRATEGY=fsdp2 sbatch scripts/slurm/diffusion.sbatch

or give other arguments by class path (``class_path: dmvae_lightning.strategies.FSDP2Strategy``,
``init_args: {save_distributed_checkpoint: true}``). The name is registered in Lightning's
``StrategyRegistry`` by :func:`register_strategies`, which ``import dmvae_lightning`` runs.

Unlike Lightning's ``FSDPStrategy`` (FSDP1, GPUs only), this also runs on CPU with gloo, which is
how ``tests/test_fsdp.py`` checks it with 2 processes.
"""

from __future__ import annotations

import os
import tempfile
from datetime import timedelta
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from lightning.pytorch.strategies.launchers.multiprocessing import (
    _MultiProcessingLauncher,
    _WorkerOutput,
)
from lightning.pytorch.trainer.states import TrainerFn

from dmvae_lightning.distributed import ExplicitDDPStrategy

__all__ = ["FSDP2Strategy", "register_strategies"]

FSDP2 = "fsdp2"


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 data parallelism over all processes (``ModelParallelStrategy`` with tensor-parallel
    size 1).

    Args:
        data_parallel_size: ``"auto"`` (default) = the world size, ``num_nodes x devices``.
            (``ModelParallelStrategy``'s own ``"auto"`` is the number of nodes, meant for a
            tensor-parallel dimension inside each node, which this strategy does not have.) An
            int must equal the world size.
        save_distributed_checkpoint: False (default): checkpoints are one file with the full
            weights and optimizer state, gathered on rank 0 (CPU) when saved and scattered when
            resumed; they load into a single process (``load_from_checkpoint``, the next stage's
            ``*_ckpt`` options). True: a folder with one shard file per rank, which only this
            strategy with the same world size resumes from.
        process_group_backend, timeout: as ``ModelParallelStrategy`` (default backend: nccl on
            GPUs, gloo on CPU).
        start_method: ``"popen"`` (default): Lightning launches the other local processes as
            new interpreters running the same command (or SLURM / torchrun start them);
            ``"fork"`` / ``"spawn"`` / ``"forkserver"``: the other processes are started from
            the calling one, as ``DDPStrategy(start_method=...)`` (``"fork"`` needs no pickling:
            notebooks, tests). After such a ``fit`` the calling process gets the full trained
            state in its (unsharded) module.
    """

    def __init__(
        self,
        data_parallel_size: Literal["auto"] | int = "auto",
        save_distributed_checkpoint: bool = False,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
    ) -> None:
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        if start_method not in ("popen", "spawn", "fork", "forkserver"):
            raise ValueError(
                "FSDP2Strategy start_method must be 'popen', 'spawn', 'fork' or 'forkserver', "
                f"got {start_method!r}"
            )
        self._start_method = start_method

    def parallel_sizes(self) -> tuple[int, int]:
        """``(data_parallel_size, tensor_parallel_size)`` the device mesh gets: ``"auto"`` is
        ``num_nodes x devices``."""
        size = self._data_parallel_size
        if size == "auto":
            size = self.num_nodes * self.num_processes
        return int(size), 1

    def setup_environment(self) -> None:
        self._data_parallel_size, self._tensor_parallel_size = self.parallel_sizes()
        super().setup_environment()

    def _configure_launcher(self) -> None:
        if self._start_method == "popen":
            super()._configure_launcher()
        else:
            self._launcher = _FullStateLauncher(self, start_method=self._start_method)


class _FullStateLauncher(_MultiProcessingLauncher):
    """Lightning's fork / spawn launcher, except that the trained weights handed back to the
    calling process are the full (gathered) state dict: the workers' ``state_dict()`` holds
    DTensor shards, which the caller's plain module cannot load."""

    def _collect_rank_zero_results(self, trainer: pl.Trainer, results: Any) -> _WorkerOutput | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        checkpoint_callback = trainer.checkpoint_callback
        best_model_path = getattr(checkpoint_callback, "best_model_path", None)
        # a collective: every rank takes part, rank 0 receives the full tensors on CPU
        state_dict = get_model_state_dict(
            trainer.lightning_module,
            options=StateDictOptions(full_state_dict=True, cpu_offload=True),
        )
        if self._strategy.local_rank != 0:
            return None
        weights_path = None
        if trainer.state.fn == TrainerFn.FITTING:
            weights_path = os.path.join(tempfile.mkdtemp(), ".temp.ckpt")
            self._strategy.checkpoint_io.save_checkpoint(state_dict, weights_path)
        extra = self.get_extra_results(trainer)
        return _WorkerOutput(best_model_path, weights_path, trainer.state, results, extra)


def register_strategies() -> None:
    """Register ``"fsdp2"`` (:class:`FSDP2Strategy` with its defaults) and the ``ddp_explicit``
    names in Lightning's ``StrategyRegistry``, so ``trainer.strategy: fsdp2`` / ``ddp_explicit``
    work. Idempotent; a name another package already registered is left alone."""
    ExplicitDDPStrategy.register_strategies(StrategyRegistry)
    if FSDP2 not in StrategyRegistry:
        StrategyRegistry.register(
            FSDP2,
            FSDP2Strategy,
            description="FSDP2 (fully_shard) data parallelism over all processes; the module "
            "shards itself in configure_model(); full-state checkpoint files",
        )
