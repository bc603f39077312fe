"""The per-sample-KL VAE's training step (the study's ``kl_vae`` arm), two ways side by side:

* ``reuse``: what ``DMVAEModule`` does now: the Gaussian KL reads the posterior of the encoder
  features that produced the batch's latents (one encoder pass per VAE step);
* ``recompute``: what it did before: the KL term ran the encoder on the images a second time
  (forward and backward), at the same value and gradients.

Sizes of ``configs/fashion_mnist/tokenizer.yaml`` + ``kl_vae/tokenizer.yaml`` (conv encoder
ch 32 (1, 2, 2) at 32x32, Gaussian MLP bottleneck to 4x8x8, decoder ch 16, PatchGAN ch 32,
KL weight 1e-9), batch 64, the discriminator on from the first step (as after ``disc_start``);
random images held in memory, ``lightning.Trainer`` as ``dmvae fit``. Prints ms per step
(median over ``--rounds`` rounds, order rotated per round, of the mean over ``--steps`` steps
after ``--warmup``) and the ratio::

    python benchmarks/bench_kl_vae.py
    python benchmarks/bench_kl_vae.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics

import torch
from bench_align import RandomImages, timed_fit
from torch.utils.data import DataLoader

from dmvae_lightning.losses.matching import GaussianKLLoss
from dmvae_lightning.modules.dmvae import DMVAEModule


class RecomputeKL(DMVAEModule):
    """The former behaviour: the KL's posterior from a second encoder pass."""

    def posterior_features(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.encoder(x)


def run(cls: type[DMVAEModule], args: argparse.Namespace) -> float:
    torch.manual_seed(0)
    module = cls(
        stage="pretrain",
        image_channels=1,
        latent_channels=4,
        encoder={"name": "conv", "ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 1},
        bottleneck_hidden=128,
        bottleneck_gaussian=True,
        decoder={"ch": 16, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "mid_attention": False},
        discriminator={"ch": 32, "n_layers": 2},
        l2_weight=1.0,
        disc_start=0,
        diffaug="translation",
        consistency_weight=1.0,
        lr=2e-3,
        warmup_steps=0,
        ema_decay=0.999,
        matching_loss=GaussianKLLoss(),
        matching_weight=1e-9,
    )
    total = args.warmup + args.steps + 1
    loader = DataLoader(RandomImages(total * args.batch_size), batch_size=args.batch_size)
    ends = timed_fit(module, loader)
    a = args.warmup - 1
    return (ends[a + args.steps] - ends[a]) / args.steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed window")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, variant order rotated")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = {"reuse": DMVAEModule, "recompute": RecomputeKL}
    names = list(variants)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % 2 :] + names[: r % 2]:
            samples[name].append(run(variants[name], args))
    ms = {name: statistics.median(v) for name, v in samples.items()}
    print(
        f"KL-VAE training step, batch {args.batch_size}, {torch.get_num_threads()} threads; "
        f"median of {args.rounds} rounds"
    )
    for name, value in ms.items():
        print(f"  {name:<10} {value:8.1f} ms / step")
    print(f"  reuse / recompute : {ms['reuse'] / ms['recompute']:.3f}")


if __name__ == "__main__":
    main()
