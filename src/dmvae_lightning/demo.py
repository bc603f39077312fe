"""``make demo``: the Fashion-MNIST pipeline on CPU, stage by stage, then a results table.

Each stage is a YAML under ``configs/fashion_mnist/`` run through the ``dmvae`` CLI; a stage whose
checkpoint already exists is skipped, so an interrupted demo continues where it stopped. Run it
from the repository root::

    python -m dmvae_lightning.demo            # or: make demo

Stages so far: 1 tokenizer pretrain. The reference model, DMD alignment, decoder fine-tune and
generator stages join as their issues land.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision

from dmvae_lightning.cli import main as cli_main


@dataclass(frozen=True)
class Stage:
    name: str
    config: str
    checkpoint: str  # written by the config's ModelCheckpoint


STAGES = (
    Stage(
        "tokenizer (stage 1)",
        "configs/fashion_mnist/tokenizer.yaml",
        "runs/fashion_mnist/checkpoints/tokenizer.ckpt",
    ),
)


def run_stage(stage: Stage, root: Path) -> float:
    """Train ``stage`` unless its checkpoint exists; returns the seconds spent."""
    ckpt = root / stage.checkpoint
    if ckpt.is_file():
        print(f"[demo] {stage.name}: {ckpt} exists, skipping")
        return 0.0
    print(f"[demo] {stage.name}: dmvae fit --config {stage.config}")
    start = time.perf_counter()
    cli_main(["fit", "--config", str(root / stage.config)])
    if not ckpt.is_file():
        raise RuntimeError(f"{stage.name} finished but wrote no checkpoint at {ckpt}")
    return time.perf_counter() - start


def evaluate_tokenizer(stage: Stage, root: Path, out_dir: Path) -> dict[str, float]:
    """Validate the tokenizer checkpoint (EMA weights) and save a reconstruction grid."""
    cli = cli_main(["--config", str(root / stage.config), "--trainer.logger", "false"], run=False)
    ckpt = str(root / stage.checkpoint)
    metrics = cli.trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)[0]
    model = cli.model.eval()
    batch = next(iter(cli.datamodule.val_dataloader()))
    with torch.no_grad(), model.ema_scope():
        x = batch["image"][:32]
        rec = model(x).clamp(-1, 1)
    grid = torchvision.utils.make_grid(
        torch.cat([x, rec]), nrow=16, normalize=True, value_range=(-1, 1)
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    torchvision.utils.save_image(grid, out_dir / "reconstructions.png")
    return {k: float(v) for k, v in metrics.items()}


def save_sample_grid(
    checkpoint: str | Path,
    out_path: str | Path,
    per_class: int = 10,
    steps: int = 50,
    cfg: float = 1.0,
    sampler: str = "euler",
    seed: int = 0,
) -> torch.Tensor:
    """Decode ``per_class`` samples of every class from a LatentDiffusionModule checkpoint (EMA
    weights, its tokenizer) into a PNG grid, one class per row. Returns the images
    (num_classes * per_class, C, H, W) in [-1, 1]."""
    from dmvae_lightning.modules.diffusion import LatentDiffusionModule

    model = LatentDiffusionModule.load_from_checkpoint(str(checkpoint), map_location="cpu").eval()
    num_classes = model.hparams.num_classes
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    generator = torch.Generator().manual_seed(seed)
    images = model.sample(
        labels, steps=steps, cfg=cfg, sampler=sampler, generator=generator, decode=True
    ).clamp(-1, 1)
    grid = torchvision.utils.make_grid(images, nrow=per_class, normalize=True, value_range=(-1, 1))
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    torchvision.utils.save_image(grid, out_path)
    return images


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".", help="repository root (holds configs/)")
    parser.add_argument("--runs", default="runs", help="where the results table and grids go")
    args = parser.parse_args(argv)
    root = Path(args.root).resolve()
    out_dir = root / args.runs / "fashion_mnist" / "demo"
    timings = {stage.name: run_stage(stage, root) for stage in STAGES}
    metrics = evaluate_tokenizer(STAGES[0], root, out_dir)

    lines = ["| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {secs:.0f} |" for name, secs in timings.items()]
    lines += ["", "| tokenizer (EMA) | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items())]
    table = "\n".join(lines)
    (out_dir / "results.md").write_text(table + "\n")
    print("\n" + table + "\n")
    print(f"[demo] checkpoints: {root / 'runs/fashion_mnist/checkpoints'}")
    print(f"[demo] TensorBoard: tensorboard --logdir {root / 'runs/fashion_mnist'}")
    print(f"[demo] reconstructions: {out_dir / 'reconstructions.png'}")
    print(f"[demo] table: {out_dir / 'results.md'}")


if __name__ == "__main__":  # pragma: no cover
    main()
