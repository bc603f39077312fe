"""Generator training throughput: latents read from a cache vs encoded on the fly.

Both variants run the same LatentDiffusionModule (configs/fashion_mnist/diffusion.yaml) through the
same Lightning Trainer, one after the other in this process; only the source of the latents
differs. Data loading is part of the timed loop. Prints images/s of each and their ratio.

    python benchmarks/bench_latent_cache.py --tokenizer_ckpt runs/fashion_mnist/checkpoints/tokenizer.ckpt

The cache (train and val splits) is encoded first if ``--cache`` does not hold one; that one-off
cost is printed too.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning.pytorch as pl  # noqa: E402

from dmvae_lightning import latents  # noqa: E402
from dmvae_lightning.cli import main as cli_main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class StepTimer(pl.Callback):
    """Wall time of training batches ``warmup`` .. end (data loading included)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end, self.images = warmup, None, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.start is not None:
            self.images += next(iter(batch.values())).shape[0]
            self.end = time.perf_counter()

    @property
    def images_per_second(self) -> float:
        return self.images / (self.end - self.start)


def run(extra: list[str], steps: int, warmup: int) -> float:
    cli = cli_main(
        [
            "--config",
            str(REPO / "configs/fashion_mnist/diffusion.yaml"),
            f"--trainer.max_steps={steps + warmup}",
            "--trainer.limit_val_batches=0",
            "--trainer.num_sanity_val_steps=0",
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.callbacks=[]",
            "--model.init_args.stats_batches=2",
            *extra,
        ],
        run=False,
    )
    timer = StepTimer(warmup)
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return timer.images_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer_ckpt", default="runs/fashion_mnist/checkpoints/tokenizer.ckpt")
    parser.add_argument("--cache", default="runs/fashion_mnist/latent_cache")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    cache = Path(args.cache)
    if not (cache / "train" / latents.META_FILE).is_file():
        start = time.perf_counter()
        for split in ("train", "val"):
            latents.main(
                [
                    "--tokenizer_ckpt",
                    args.tokenizer_ckpt,
                    "--out",
                    str(cache / split),
                    "--split",
                    split,
                    "--batch_size",
                    "256",
                    "--dtype",
                    "float32",
                    "--no_progress",
                ]
            )
        print(f"encoding the cache (70k images, once): {time.perf_counter() - start:.1f} s")

    tok = [f"--model.init_args.tokenizer_ckpt={args.tokenizer_ckpt}"]
    on_the_fly = run(tok, args.steps, args.warmup)
    cached = run(
        [
            *tok,
            "--model.init_args.encode_images=false",
            "--data.init_args.dataset=latent_cache",
            f"--data.init_args.root={cache}",
        ],
        args.steps,
        args.warmup,
    )
    print()
    print("| latents from | images/s | ratio |")
    print("|---|---|---|")
    print(f"| tokenizer, encoded every step | {on_the_fly:.0f} | 1.00 |")
    print(f"| memory-mapped cache | {cached:.0f} | {cached / on_the_fly:.2f} |")


if __name__ == "__main__":
    main()
