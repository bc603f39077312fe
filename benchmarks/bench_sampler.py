"""The study's sampler (what evaluates every generator seed): 50 Euler steps of the Fashion-MNIST
generator DiT (``configs/fashion_mnist/diffusion.yaml``: 4 tokens of 4x4x4, width 128, depth 4),
class-balanced labels, no CFG, two ways side by side:

* ``distinct``: what ``DiT.forward`` does now without grad: the adaLN projections (a
  Linear(D, 6D) per block and Linear(D, 2D) in the final layer, the largest matmuls of a
  4-token DiT) run once per distinct conditioning row (one t per step, ten classes) and are
  gathered back to the samples;
* ``per_sample``: what it did before: the projections run on every sample's row.

Random weights (the adaLN-Zero layers are not zero here, so every path is exercised). Prints
ms per ``--batch`` samples (median over ``--rounds`` rounds, order rotated per round) and the
ratio, then the largest difference between the two samples (same noise)::

    python benchmarks/bench_sampler.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import torch
from bench_align import rotated

from dmvae_lightning import flow
from dmvae_lightning.nets import dit as dit_module
from dmvae_lightning.nets.dit import DiT


def build() -> DiT:
    """The study generator's DiT with random (non-zero) weights, eval mode."""
    torch.manual_seed(0)
    net = DiT.from_preset(
        "tiny",
        input_size=8,
        in_channels=4,
        num_classes=10,
        patch_size=4,
        hidden_size=128,
        depth=4,
        num_heads=4,
    )
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return net.eval()


def sample(net: DiT, labels: torch.Tensor, steps: int) -> torch.Tensor:
    noise = torch.randn(labels.shape[0], 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return flow.euler_sample(lambda x, t: net(x, t, labels), noise, steps)


def per_sample(c: torch.Tensor) -> tuple[torch.Tensor, None]:
    """The former behaviour: one conditioning row per sample."""
    return c, None


def run(net: DiT, labels: torch.Tensor, steps: int, merge: bool) -> tuple[float, torch.Tensor]:
    patch = mock.patch.object(dit_module, "_distinct_rows", per_sample) if not merge else None
    if patch is not None:
        patch.start()
    try:
        start = time.perf_counter()
        out = sample(net, labels, steps)
        return (time.perf_counter() - start) * 1e3, out
    finally:
        if patch is not None:
            patch.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=500, help="samples per call (the study's)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3, help="rounds, variant order rotated")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    net = build()
    labels = torch.arange(args.batch) % 10
    run(net, labels[:20], 2, True)  # warm-up
    names = {"distinct": True, "per_sample": False}
    times: dict[str, list[float]] = {name: [] for name in names}
    outs: dict[str, torch.Tensor] = {}
    for r in range(args.rounds):
        for name in rotated(list(names), r):
            ms, outs[name] = run(net, labels, args.steps, names[name])
            times[name].append(ms)
    med = {name: statistics.median(v) for name, v in times.items()}
    print(
        f"Euler sampler, {args.steps} steps, {args.batch} samples, "
        f"{torch.get_num_threads()} threads; median of {args.rounds} rounds"
    )
    for name, value in med.items():
        print(f"  {name:<11} {value:9.1f} ms / batch")
    print(f"  distinct / per_sample : {med['distinct'] / med['per_sample']:.3f}")
    diff = (outs["distinct"] - outs["per_sample"]).abs().max().item()
    scale = outs["per_sample"].abs().max().item()
    print(f"  largest sample difference {diff:.2e} (largest value {scale:.2f})")


if __name__ == "__main__":
    main()
