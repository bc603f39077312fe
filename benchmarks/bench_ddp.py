"""The DMD alignment step on 2 processes (CPU, gloo), two ways, side by side in one run:

* ``explicit``: ``strategy: ddp_explicit`` (:class:`~dmvae_lightning.distributed.ExplicitDDPStrategy`):
  no DDP wrapper; after each backward the gradients of the toggled optimizer's parameters are
  averaged in flat buckets;
* ``wrapper``: Lightning's DDP wrapper with ``find_unused_parameters=True`` (the only wrapper
  setting that runs DMVAEModule): each backward searches its graph and all-reduces every bucket of
  the whole module, tokenizer, discriminator and fake score model.

Same module as ``bench_align.py`` (the Fashion-MNIST alignment sizes, DMD with CFG 5,
``vae_every`` 5), same random data, per-rank batch ``--batch_size``, one thread per process.
Prints, per variant, ms per batch on rank 0 (median over ``--rounds`` runs, variant order
alternating, of the mean over the batches after ``--warmup``; whole ``vae_every`` cycles) and the
gradient elements all-reduced per batch (counted by the strategy, or by a counting DDP
communication hook for the wrapper), and the ratios::

    python benchmarks/bench_ddp.py
    python benchmarks/bench_ddp.py --batch_size 32 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_align import RandomImages, build, rotated  # noqa: E402

import dmvae_lightning  # noqa: E402,F401  (registers ddp_explicit)

STRATEGIES = {"explicit": "ddp_explicit_fork", "wrapper": "ddp_fork_find_unused_parameters_true"}


class Probe(pl.Callback):
    """Rank 0 writes batch end times and the all-reduced gradient elements to ``out``."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.ends: list[float] = []
        self.hook_elements = [0]

    def on_train_start(self, trainer, pl_module) -> None:
        torch.set_num_threads(1)
        model = trainer.strategy.model
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            counter = self.hook_elements

            def counting_hook(state, bucket):
                counter[0] += bucket.buffer().numel()
                return allreduce_hook(state, bucket)

            model.register_comm_hook(None, counting_hook)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        stats = getattr(trainer.strategy, "comm_stats", None)
        elements = stats["elements"] if stats is not None else self.hook_elements[0]
        if trainer.global_rank == 0:
            torch.save({"ends": self.ends, "elements": elements}, self.out)


def run(args: argparse.Namespace, variant: str, out: Path) -> tuple[float, float]:
    total = args.warmup + args.batches
    module = build(argparse.Namespace(cfg=args.cfg, vae_every=args.vae_every))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=STRATEGIES[variant],
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[Probe(out)],
    )
    # 2 ranks x total batches (the distributed sampler splits the set)
    loader = DataLoader(RandomImages(2 * total * args.batch_size), batch_size=args.batch_size)
    trainer.fit(module, train_dataloaders=loader)
    result = torch.load(out)
    ends = result["ends"]
    ms = 1e3 * (ends[-1] - ends[args.warmup - 1]) / args.batches
    return ms, result["elements"] / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch_size", type=int, default=16, help="per rank")
    parser.add_argument("--batches", type=int, default=20, help="timed, a multiple of vae_every")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--vae_every", type=int, default=5)
    parser.add_argument("--cfg", type=float, default=5.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    times: dict[str, list[float]] = {v: [] for v in STRATEGIES}
    elements: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for variant in rotated(list(STRATEGIES), r):
                ms, per_batch = run(args, variant, Path(tmp) / f"{variant}{r}.pt")
                times[variant].append(ms)
                elements[variant] = per_batch
    print(
        f"\n2 processes x batch {args.batch_size}, vae_every {args.vae_every}, CFG {args.cfg}, "
        f"{args.batches} timed batches, median of {args.rounds} rounds"
    )
    print(f"{'variant':10s} {'ms/batch':>10s} {'grad elements/batch':>20s} {'MB/batch':>9s}")
    for variant in STRATEGIES:
        ms = statistics.median(times[variant])
        print(
            f"{variant:10s} {ms:10.1f} {elements[variant]:20.0f} "
            f"{4 * elements[variant] / 2**20:9.2f}"
        )
    ex, wr = (statistics.median(times[v]) for v in ("explicit", "wrapper"))
    print(
        f"explicit / wrapper: time {ex / wr:.2f}, "
        f"elements {elements['explicit'] / elements['wrapper']:.3f}"
    )


if __name__ == "__main__":
    main()
