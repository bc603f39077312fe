"""Evaluation helpers shared by the study and ``make demo``: Fashion-MNIST tensors, seeded subsets,
batched no-grad application, latent distances to a reference, a linear probe and the posterior KL
of a Gaussian bottleneck. Plain tensors in and Python numbers out; nothing here trains a stage.

Conventions: images are (N, 1, 32, 32) in [-1, 1] (Fashion-MNIST padded to 32), labels (N,) int64,
latents (N, C, h, w) raw (the tokenizer's output) unless a function says otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

__all__ = [
    "fashion_mnist",
    "in_chunks",
    "latent_distances",
    "linear_probe",
    "load_tokenizer",
    "posterior_kl",
    "seeded_indices",
    "seeded_subset",
]


def fashion_mnist(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of Fashion-MNIST ``split`` ("train" or "test"), (N, 1, 32, 32) in [-1, 1], and
    its labels (N,), in the data set's order."""
    from dmvae_lightning.data.images import FashionMNIST

    return FashionMNIST(split=split, channels=1, pad_to=32).as_tensors()


def seeded_indices(total: int, n: int, seed: int) -> torch.Tensor:
    """The first ``n`` of ``torch.randperm(total)`` under ``seed`` (the same rows for the same
    seed on every machine): which rows :func:`seeded_subset` takes."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]


def seeded_subset(
    x: torch.Tensor, y: torch.Tensor, n: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` rows of ``(x, y)``, those of :func:`seeded_indices` ``(len(x), n, seed)``."""
    order = seeded_indices(x.shape[0], n, seed)
    return x[order], y[order]


CHUNK = 250
"""Rows per encoder / decoder call of the study's no-grad passes (latent caches, tokenizer
evaluation). At 32x32 a ch-32 encoder's activations for 250 images (31 MiB) still fit under
the 32 MiB mmap threshold of :func:`~dmvae_lightning.utils.malloc.tune_malloc`, 500 do not:
encoding with chunks of 250 took 0.75x the time of 500 (``kl_vae``, one thread), and gave the
same latents bit for bit in one torch thread, a study worker's (the ``kl_vae``,
``kl_vae_narrow`` and ``dmvae_ssl`` tokenizers; ``tests/test_study.py``); with more threads
a few rows may differ in the last bits, as they do between thread counts."""


def in_chunks(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, size: int = CHUNK
) -> torch.Tensor:
    """``fn`` applied to ``x`` in slices of ``size`` rows without gradients, concatenated."""
    with torch.no_grad():
        return torch.cat([fn(part) for part in x.split(size)])


def load_tokenizer(ckpt: str | Path):
    """A frozen tokenizer (encode / decode, eval mode) from any tokenizer checkpoint."""
    from dmvae_lightning.latents import load_frozen_tokenizer

    return load_frozen_tokenizer(ckpt, option=str(ckpt))


def latent_distances(z: torch.Tensor, reference: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """``{"mmd": RBF MMD^2 (unbiased), "swd": sliced W2^2 (512 directions)}`` between latent sets
    (N, ...) and (M, ...) in the space given (normalise both first). The random directions and
    bandwidth draws come from ``seed`` without touching the global RNG."""
    from dmvae_lightning.losses.matching import MMDLoss, SlicedWassersteinLoss

    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mmd = float(MMDLoss().loss(z, reference))
        swd = float(SlicedWassersteinLoss(num_projections=512).loss(z, reference))
    return {"mmd": mmd, "swd": swd}


def linear_probe(
    z_train: torch.Tensor,
    y_train: torch.Tensor,
    z_test: torch.Tensor,
    y_test: torch.Tensor,
    steps: int = 300,
    weight_decay: float = 1e-4,
) -> float:
    """Test accuracy of a multinomial logistic regression on flattened latents (standardised
    with the training set's per-feature mean / std; full-batch Adam, ``steps`` steps, seeded)."""
    a, b = z_train.flatten(1).double(), z_test.flatten(1).double()
    mean, std = a.mean(0), a.std(0).clamp_min(1e-6)
    a, b = ((a - mean) / std).float(), ((b - mean) / std).float()
    classes = int(max(y_train.max(), y_test.max())) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        head = torch.nn.Linear(a.shape[1], classes)
    opt = torch.optim.Adam(head.parameters(), lr=0.05, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(head(a), y_train).backward()
            opt.step()
    with torch.no_grad():
        return float((head(b).argmax(1) == y_test).float().mean())


def posterior_kl(tokenizer, x: torch.Tensor) -> float | None:
    """Mean over images of ``KL(q(z|x) || N(0, I))`` summed over latent elements, for a tokenizer
    (or a module holding one as ``.tokenizer``) with a Gaussian bottleneck; None otherwise."""
    parts = getattr(tokenizer, "tokenizer", tokenizer)
    if not getattr(parts.bottleneck, "gaussian", False):
        return None
    with torch.no_grad():
        mean, logvar = parts.bottleneck.forward_stats(parts.encoder(x))
        kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).flatten(1).sum(1)
    return float(kl.mean())


def flow_matching_loss(module, z: torch.Tensor, y: torch.Tensor, chunk: int = 1000) -> float:
    """Mean flow-matching velocity loss of ``module`` (a LatentDiffusionModule, EMA weights, no
    label dropout) on normalised latents ``z`` (N, C, H, W) with labels ``y`` (N,): stratified
    ``t`` (one per latent, fixed permutation) and fixed noise, so two models on the same ``z``
    see the same draws. Lower: the model fits these latents better."""
    from dmvae_lightning import flow

    n = z.shape[0]
    t = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    t = t[torch.randperm(n, generator=torch.Generator().manual_seed(1))]
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(2))
    total = 0.0
    with torch.no_grad(), module.ema_scope():
        for sl in torch.arange(n).split(chunk):
            loss, _ = flow.velocity_loss(module.dit, z[sl], y[sl], t=t[sl], eps=eps[sl])
            total += float(loss) * sl.numel()
    return total / n
