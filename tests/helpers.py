"""Helpers shared by the test modules (the tests folder is on sys.path under pytest)."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning
import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def save_module_checkpoint(module: pl.LightningModule, path: Path) -> Path:
    """``module`` as a Lightning checkpoint file (state dict, hyperparameters, version), what
    ``load_from_checkpoint`` and the library's loaders read, without a Trainer."""
    state = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": lightning.__version__,
    }
    torch.save(state, path)
    return path


def checkpoints(root: Path) -> list[Path]:
    """Every ``.ckpt`` under ``root``, sorted by path."""
    return sorted(Path(root).rglob("*.ckpt"))


def assert_same(a, b, path: str = "") -> None:
    """Bit-exact equality of nested dicts / lists / tensors (e.g. state dicts, optimizer states),
    naming the first place that differs."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"differs at {path}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"keys differ at {path}"
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), f"lengths differ at {path}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"differs at {path}: {a} != {b}"


class SaveAtBatch(pl.Callback):
    """Writes a checkpoint after global batch ``at`` (as ModelCheckpoint(every_n_train_steps) does)."""

    def __init__(self, at: int, path: Path) -> None:
        self.at, self.path, self.seen = at, path, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen += 1
        if self.seen == self.at:
            trainer.save_checkpoint(self.path)


def run_notebook(path: Path) -> dict:
    """Execute the code cells of a notebook in order in one namespace, with matplotlib's Agg
    backend and ``plt.show`` a no-op (no Jupyter needed). Returns the namespace."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    namespace: dict = {"__name__": "__notebook__"}
    original_show = plt.show
    plt.show = lambda *args, **kwargs: plt.close("all")
    try:
        for i, cell in enumerate(json.loads(Path(path).read_text())["cells"]):
            if cell["cell_type"] == "code":
                code = compile("".join(cell["source"]), f"{Path(path).name}[cell {i}]", "exec")
                exec(code, namespace)
    finally:
        plt.show = original_show
    return namespace


@contextmanager
def forkable_threads() -> Iterator[None]:
    """One intra-op thread while forked workers run, restored after: a child forked after the
    parent ran multi-threaded OpenMP regions inherits a thread pool without its threads and
    hangs in its first parallel region (GNU OpenMP). With one thread no region uses the pool."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(fn(rank, world), out / f"out{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(fn, tmp_path: Path, world: int = 2) -> list:
    """``fn(rank, world)`` in ``world`` forked processes of one gloo group; their results."""
    with forkable_threads():
        mp.start_processes(
            _worker, args=(world, free_port(), fn, tmp_path), nprocs=world, start_method="fork"
        )
    return [torch.load(tmp_path / f"out{r}.pt") for r in range(world)]


class SaveRankState(pl.Callback):
    """Writes every rank's module state (CPU copies) at the start and the end of training to
    ``<folder>/start<R>.pt`` and ``<folder>/rank<R>.pt``."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def _save(self, trainer, pl_module, name: str) -> None:
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, self.folder / f"{name}{trainer.global_rank}.pt")

    def on_train_start(self, trainer, pl_module) -> None:
        self._save(trainer, pl_module, "start")

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(trainer, pl_module, "rank")
        stats = getattr(trainer.strategy, "comm_stats", None)
        torch.save(stats, self.folder / f"comm{trainer.global_rank}.pt")


class SlurmProbe(SaveRankState):
    """For ``dmvae fit`` runs in subprocesses (``--trainer.callbacks+=helpers.SlurmProbe``):
    :class:`SaveRankState` into ``$PROBE_OUT``, and SIGUSR1 delivered to its own process at the
    start of batch ``$PROBE_SIGNAL_AT`` (1-based, counted over the fit; unset or 0: never)."""

    def __init__(self) -> None:
        super().__init__(Path(os.environ["PROBE_OUT"]))
        self.folder.mkdir(parents=True, exist_ok=True)
        self.at = int(os.environ.get("PROBE_SIGNAL_AT", "0"))
        self.seen = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen += 1
        if self.seen == self.at:
            os.kill(os.getpid(), signal.SIGUSR1)


REPO = Path(__file__).resolve().parents[1]
#: Folders of overlays stacked on the base config of the same name one folder up (as the demo
#: runs them): the matching-weight-0 ablation and the per-sample-KL VAE baseline.
OVERLAY_DIRS = ("ablation", "kl_vae")


def shipped_configs() -> list[str]:
    """Every ``dmvae`` config under configs/ (repository-relative), without the study's arm
    files (``configs/*/study/*.yaml``: arm specs read by dmvae_lightning.study, not configs)."""
    paths = (REPO / "configs").rglob("*.yaml")
    return sorted(str(p.relative_to(REPO)) for p in paths if p.parent.name != "study")


def config_stack(config: str) -> list[str]:
    """``--config`` arguments for a shipped file: an overlay (:data:`OVERLAY_DIRS`) is stacked
    on the base config of the same name one folder up."""
    path = REPO / config
    if path.parent.name in OVERLAY_DIRS:
        return ["--config", str(path.parent.parent / path.name), "--config", str(path)]
    return ["--config", str(path)]
