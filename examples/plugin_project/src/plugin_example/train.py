"""Train this project's tokenizer and diffusion model from Python with a plain ``lightning.Trainer``
(no ``dmvae`` CLI): the same classes the YAML configs name by ``class_path``.

    python -m plugin_example.train --out runs/plugin_example/script --batches 4
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import lightning as L

from dmvae_lightning import ReferenceDistribution
from plugin_example.losses import MomentMatchingLoss
from plugin_example.modules import PatchEncoderDMVAE, StratifiedTimeDiffusion
from plugin_example.sources import LaplaceSource

LATENT_SHAPE = (4, 8, 8)


def data(root: str | None, loc: float, scale: float) -> ReferenceDistribution:
    """Fashion-MNIST (a 64-image training subset) with ``LaplaceSource`` reference samples."""
    return ReferenceDistribution(
        dataset="fashion_mnist",
        root=root,
        channels=1,
        image_size=32,
        batch_size=8,
        val_batch_size=16,
        num_workers=0,
        train_subset=64,
        val_subset=16,
        reference=LaplaceSource(LATENT_SHAPE, loc=loc, scale=scale),
    )


def trainer(out: Path, batches: int) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=batches,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Fit the tokenizer, then the diffusion model; save both checkpoints under ``--out``.

    Returns ``{"tokenizer", "diffusion"}`` (the trained modules) and ``{"tokenizer_ckpt",
    "diffusion_ckpt"}`` (their checkpoint paths)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/plugin_example/script", help="output folder")
    parser.add_argument("--batches", type=int, default=4, help="training batches per model")
    parser.add_argument("--data_root", default=None, help="Fashion-MNIST folder (default: found)")
    parser.add_argument("--loc", type=float, default=2.0, help="mean of the Laplace reference")
    parser.add_argument("--scale", type=float, default=0.5, help="scale of the Laplace reference")
    args = parser.parse_args(argv)
    out = Path(args.out)
    L.seed_everything(0)

    tokenizer = PatchEncoderDMVAE(
        image_channels=1,
        latent_channels=LATENT_SHAPE[0],
        encoder={"ch": 16, "patch_size": 4},
        bottleneck_hidden=16,
        decoder={"ch": 8, "ch_mult": [1, 2, 2], "num_res_blocks": 0, "mid_attention": False},
        discriminator={"ch": 8, "n_layers": 2},
        disc_start=1000,
        lr=1e-3,
        warmup_steps=2,
        ema_decay=0.9,
        num_log_images=4,
        matching_loss=MomentMatchingLoss(),
        matching_weight=1.0,
        vae_every=1,
    )
    fit = trainer(out / "tokenizer", args.batches)
    fit.fit(tokenizer, datamodule=data(args.data_root, args.loc, args.scale))
    tokenizer_ckpt = out / "tokenizer.ckpt"
    fit.save_checkpoint(tokenizer_ckpt)

    diffusion = StratifiedTimeDiffusion(
        latent_shape=list(LATENT_SHAPE),
        num_classes=10,
        dit={"preset": "tiny", "patch_size": 4, "hidden_size": 32, "depth": 1, "num_heads": 2},
        input_key="reference",
        encode_images=False,
        stats_batches=2,  # measure the latent mean / scale before the first step
        lr=1e-3,
        warmup_steps=2,
        ema_decay=0.9,
        num_log_images=0,
        sample_steps=4,
    )
    fit = trainer(out / "diffusion", args.batches)
    fit.fit(diffusion, datamodule=data(args.data_root, args.loc, args.scale))
    diffusion_ckpt = out / "diffusion.ckpt"
    fit.save_checkpoint(diffusion_ckpt)
    return {
        "tokenizer": tokenizer,
        "diffusion": diffusion,
        "tokenizer_ckpt": tokenizer_ckpt,
        "diffusion_ckpt": diffusion_ckpt,
    }


def console() -> None:
    """The ``plugin-example-train`` console script."""
    main()


if __name__ == "__main__":
    console()
