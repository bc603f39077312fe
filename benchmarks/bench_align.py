"""The DMD alignment step (stage 3) three ways, side by side in one run:

* ``lightning``: ``DMVAEModule`` with a DMD matching loss trained by ``lightning.Trainer`` (what
  ``dmvae fit`` runs): cond + null CFG batched into ONE forward per score model, encode only on
  the batches where the VAE does not step;
* ``plain``: the same module and the same work in a hand-written PyTorch loop (no Trainer), to
  measure what Lightning costs;
* ``naive``: the public code's loop at the same config: each score model called twice for CFG
  (4 forwards per VAE step instead of 2) and a full decode on every batch, thrown away on the
  batches where the VAE does not step.

Same model sizes (the Fashion-MNIST alignment config: 32x32x1 images -> 4x8x8 latents, conv
encoder, decoder ch 16 (1, 2, 2), DiT hidden 128 x depth 4, patch 2), batch, ``vae_every`` (5)
and CFG scale (5, the paper's) for all three; data are random tensors held in memory. The module
runs its "pretrain" stage with the matching loss and ``vae_every``: the same training step as
"align" without needing a stage-1 checkpoint. Prints ms per batch (median over ``--rounds``
rounds, variant order rotated per round, of the mean over ``--batches`` batches after ``--warmup``
batches) and the ratios::

    python benchmarks/bench_align.py
    python benchmarks/bench_align.py --threads 1 --batch_size 32
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterator

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from dmvae_lightning import flow
from dmvae_lightning.losses.matching import DMDLoss
from dmvae_lightning.modules.dmvae import DMVAEModule
from dmvae_lightning.nets.dit import DiT
from dmvae_lightning.utils.rng import step_rng


def time_steps(step: Callable[[], object], n: int, device: torch.device | str = "cpu") -> float:
    """ms per call of ``step()`` over ``n`` calls (CUDA synchronised around the window)."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        step()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / n * 1e3


def rotated(items: list, r: int) -> list:
    """``items`` in round ``r``'s order: rotated by ``r``, so that no variant always runs first."""
    return items[r % len(items) :] + items[: r % len(items)]


class RandomImages(Dataset):
    """``n`` random 1x32x32 images in [-1, 1] with labels, held in memory."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, 1, 32, 32, generator=g) * 2 - 1
        self.y = torch.randint(0, 10, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.x[i], "label": self.y[i]}


def build(args: argparse.Namespace) -> DMVAEModule:
    torch.manual_seed(0)
    real = DiT(
        input_size=8,
        in_channels=4,
        patch_size=2,
        hidden_size=128,
        depth=4,
        num_heads=4,
        num_classes=10,
    )
    return DMVAEModule(
        stage="pretrain",
        image_channels=1,
        latent_channels=4,
        encoder={"name": "conv", "ch": 16, "ch_mult": [1, 2, 2], "num_res_blocks": 1},
        bottleneck_hidden=128,
        decoder={"ch": 16, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "mid_attention": False},
        discriminator={"ch": 32, "n_layers": 2},
        l2_weight=1.0,
        disc_start=0,
        diffaug="translation",
        lr=5e-4,
        warmup_steps=0,
        ema_decay=0.999,
        matching_loss=DMDLoss(real, cfg_scale=args.cfg),
        matching_weight=10.0,
        vae_every=args.vae_every,
    )


def batches(args: argparse.Namespace, n: int) -> Iterator[dict[str, torch.Tensor]]:
    loader = DataLoader(RandomImages(n * args.batch_size), batch_size=args.batch_size)
    for batch in loader:
        yield {k: v.to(args.device) for k, v in batch.items()}


# ---------------------------------------------------------------------------------- Lightning
class BatchTimer(pl.Callback):
    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())


def timed_fit(module: pl.LightningModule, loader: DataLoader, device: str = "cpu") -> list[float]:
    """One epoch of ``loader`` under a bare ``lightning.Trainer`` (no logger, checkpoints,
    progress bar or validation); returns the end time of every batch."""
    timer = BatchTimer()
    trainer = pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[timer],
    )
    trainer.fit(module, train_dataloaders=loader)
    return timer.ends


def run_lightning(args: argparse.Namespace, total: int) -> list[float]:
    loader = DataLoader(RandomImages(total * args.batch_size), batch_size=args.batch_size)
    return timed_fit(build(args), loader, args.device)


# ---------------------------------------------------------------------------------- plain loops
def _step(opt: torch.optim.Optimizer, loss: torch.Tensor, params: list, clip: float) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()


def naive_dmd(loss_fn: DMDLoss, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The public loop's DMD: four separate score-model calls (cond and null, real and fake)."""
    t = flow.sample_t(z.shape[0], z.device)
    eps = torch.randn_like(z)
    null = torch.full_like(labels, loss_fn.null_class)
    w = loss_fn.cfg_scale
    with torch.no_grad():
        z_t = flow.interpolate(z.detach(), eps, t)

        def guided(model):
            v_c, v_u = model(z_t, t, labels), model(z_t, t, null)
            return v_u + w * (v_c - v_u)

        x_real = flow.velocity_to_x1(z_t, t, guided(loss_fn.real))
        x_fake = flow.velocity_to_x1(z_t, t, guided(loss_fn.fake))
        grad = torch.nan_to_num(
            (x_fake - x_real) / (z.detach() - x_real).abs().mean(dim=(1, 2, 3), keepdim=True)
        )
    return 0.5 * F.mse_loss(z, (z - grad).detach())


def run_plain(args: argparse.Namespace, total: int, naive: bool) -> list[float]:
    """The training step written out by hand (``naive``: 4 CFG calls, decode every batch)."""
    module = build(args).to(args.device).train()
    loss_fn = module.matching_loss
    gen_params = [p for p in module.tokenizer.parameters() if p.requires_grad]
    disc_params = list(module.discriminator.parameters())
    fake_params = list(loss_fn.fake_parameters())
    kw = {"lr": 5e-4, "betas": (0.9, 0.95)}
    opt_g = torch.optim.AdamW(gen_params, weight_decay=5e-3, **kw)
    opt_d = torch.optim.AdamW(disc_params, weight_decay=5e-4, **kw)
    opt_f = torch.optim.AdamW(fake_params, weight_decay=0.0, **kw)
    ends = []
    for k, batch in enumerate(batches(args, total)):
        x, y = batch["image"], batch["label"]
        vae = module.is_vae_step(k)
        with step_rng(0, k, 0, x.device):
            if vae:
                for p in disc_params + fake_params:
                    p.requires_grad_(False)
                z = module.encode(x)
                x_rec = module.decode(z)
                loss, _ = module.generator_loss(x, x_rec, z)
                z_n = loss_fn.normalize(z)
                matching = naive_dmd(loss_fn, z_n, y) if naive else loss_fn(z_n, y)
                _step(opt_g, loss + 10.0 * matching, gen_params, 1.0)
                for p in disc_params:
                    p.requires_grad_(True)
                d_loss, _ = module.discriminator_loss(x, x_rec.detach())
                _step(opt_d, d_loss, disc_params, 1.0)
                for p in fake_params:
                    p.requires_grad_(True)
                z = z.detach()
                module.ema.update(module.ema_target())
            else:
                if naive:  # the full forward, graph and all, computed and thrown away
                    z = module.encode(x)
                    module.decode(z)
                    z = z.detach()
                else:
                    with torch.no_grad():
                        z = module.encode(x)
            f_loss, _ = module.fake_loss(z, batch)
            _step(opt_f, f_loss, fake_params, 1.0)
        module.batch_count += 1
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        ends.append(time.perf_counter())
    return ends


def per_batch_ms(ends: list[float], args: argparse.Namespace) -> float:
    """ms per batch over the ``args.batches`` batches after the warm-up."""
    a = args.warmup - 1
    return (ends[a + args.batches] - ends[a]) / args.batches * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--vae_every", type=int, default=5)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batches", type=int, default=20, help="batches per timed window")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, variant order rotated")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batches % args.vae_every:
        parser.error("--batches must be a multiple of --vae_every (same VAE steps per window)")
    total = args.warmup + args.batches + 1
    runs: dict[str, Callable[[], list[float]]] = {
        "naive": lambda: run_plain(args, total, naive=True),
        "plain": lambda: run_plain(args, total, naive=False),
        "lightning": lambda: run_lightning(args, total),
    }
    names = list(runs)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in rotated(names, r):
            samples[name].append(per_batch_ms(runs[name](), args))
    ms = {name: statistics.median(values) for name, values in samples.items()}
    print(
        f"alignment step, batch {args.batch_size}, vae_every {args.vae_every}, CFG {args.cfg}, "
        f"{torch.get_num_threads()} threads, {args.device}; median of {args.rounds} rounds"
    )
    for name, value in ms.items():
        print(f"  {name:<10} {value:8.1f} ms / batch")
    print(f"  ours (lightning) / naive loop : {ms['lightning'] / ms['naive']:.3f}")
    print(f"  lightning / plain loop        : {ms['lightning'] / ms['plain']:.3f}")


if __name__ == "__main__":
    main()
