"""SLURM auto-requeue at a batch boundary all ranks agree on.

Lightning's own SLURM handler (``SLURMEnvironment(auto_requeue=True)``, the default) writes the
requeue checkpoint *inside the signal handler*, i.e. wherever each process happens to be when
``SIGUSR1`` arrives. With several tasks that is a different point on every rank: rank 0 may be
between the generator and the discriminator step (the checkpoint then holds half a training
step), and the collectives of the save (a barrier) meet the other ranks' gradient all-reduces,
which hangs or fails the job instead of requeueing it (Lightning-AI/pytorch-lightning issue
21406 reports the intermittent hangs; ``tests/test_slurm.py`` reproduces one with 2 tasks
signalled at different batches). Deferring to the next hook is not enough either: the ranks
must also agree on *which* batch.

:class:`SynchronizedRequeue` (added to every ``dmvae`` run by the CLI) replaces that handler,
once training starts, by one that only records the signal. At the end of every training batch
the ranks all-reduce one flag (MAX); when any rank got the signal, all of them run Lightning's
requeue routine there, together: ``hpc_ckpt_N.ckpt`` after a complete batch, ``scontrol requeue``
from rank 0, and the run stops. The requeued job resumes from that checkpoint (Lightning looks
for ``hpc_ckpt_*`` in ``default_root_dir``). Outside SLURM, or with ``auto_requeue=False``, the
callback does nothing.
"""

from __future__ import annotations

import signal
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import SLURMEnvironment

from dmvae_lightning.distributed import is_distributed

__all__ = ["SynchronizedRequeue"]


class SynchronizedRequeue(pl.Callback):
    """Defer SLURM's requeue signal to the end of a training batch, on all ranks together.

    Args:
        check_every_n_batches: batches between two checks (one all-reduce of a single value
            each). The signal comes ``--signal=SIGUSR1@90`` seconds before the time limit, so
            ``n`` batches must take well under that.
    """

    def __init__(self, check_every_n_batches: int = 1) -> None:
        if check_every_n_batches < 1:
            raise ValueError(f"check_every_n_batches must be >= 1, got {check_every_n_batches}")
        self.check_every_n_batches = int(check_every_n_batches)
        self.requested = False
        self._signum: int | None = None
        self._batches = 0

    @property
    def active(self) -> bool:
        """Whether the requeue signal is being deferred (SLURM job with auto-requeue)."""
        return self._signum is not None

    def _record(self, signum: int, frame: Any) -> None:
        self.requested = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Replace the requeue handler Lightning registered for this fit (its signal connector
        puts the original handlers back at teardown)."""
        # the environment Lightning's signal connector consults (single-device strategies
        # have no cluster_environment of their own)
        environment = trainer._accelerator_connector.cluster_environment
        if not isinstance(environment, SLURMEnvironment) or not environment.auto_requeue:
            return
        if not hasattr(signal, "SIGUSR1"):  # Windows
            return
        self._signum = int(environment.requeue_signal or signal.SIGUSR1)
        self.requested = False
        self._batches = 0
        signal.signal(self._signum, self._record)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx
    ) -> None:
        if not self.active:
            return
        self._batches += 1
        if self._batches % self.check_every_n_batches:
            return
        flag = torch.tensor([int(self.requested)], device=trainer.strategy.root_device)
        if is_distributed():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not int(flag.item()):
            return
        self.requested = False
        # Lightning's routine (checkpoint on every rank, `scontrol requeue` on rank 0), now at
        # the same batch boundary everywhere.
        trainer._signal_connector._slurm_sigusr_handler_fn(self._signum, None)
        trainer.should_stop = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._signum = None
