"""``make demo``: the whole Fashion-MNIST DMVAE pipeline on CPU, stage by stage, then a results
table comparing the aligned tokenizer with the matching-weight-0 ablation and a per-sample-KL
VAE (the paper's headline comparison, one seed; ``dmvae study`` repeats it over seeds).

Each stage is one or more stacked YAML files under ``configs/fashion_mnist/`` run through the
``dmvae`` CLI; a stage whose checkpoint already exists is skipped, and one killed midway is
resumed from its last epoch-end checkpoint, so an interrupted demo continues where it stopped
(delete a checkpoint to redo its stage). Run it from the repository
root::

    python -m dmvae_lightning.demo            # or: make demo

Stages: supervised classifier (the frozen "foundation" encoder), domain feature network (for
FID), 1 tokenizer pretrain and the per-sample-KL VAE baseline, 2 reference model, 3 DMD
alignment and its matching-weight-0 ablation, 4 decoder fine-tune (both), 5 generator (all three
tokenizers and the stage-1 one's reference). Then, on held-out test images:
PSNR, rFID and gFID with the domain feature network, and the distance (MMD, sliced Wasserstein)
between each tokenizer's latents and the reference distribution (stage-1 latents of training
images), in the reference model's normalised space.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
import yaml

from dmvae_lightning.cli import main as cli_main
from dmvae_lightning.study.evaluation import (
    fashion_mnist,
    in_chunks,
    latent_distances,
    seeded_subset,
)

CONFIGS = "configs/fashion_mnist"
CKPTS = "runs/fashion_mnist/checkpoints"


@dataclass(frozen=True)
class Stage:
    """A training stage: ``dmvae fit`` with ``configs`` stacked in order; done when
    ``checkpoint`` (written by the configs' ModelCheckpoint) exists."""

    name: str
    configs: tuple[str, ...]
    checkpoint: str


def _stage(name: str, checkpoint: str, *configs: str) -> Stage:
    return Stage(name, tuple(f"{CONFIGS}/{c}" for c in configs), f"{CKPTS}/{checkpoint}")


STAGES = (
    _stage("classifier (frozen encoder)", "classifier.ckpt", "classifier.yaml"),
    _stage("domain feature net (FID)", "fid_net.ckpt", "fid_net.yaml"),
    _stage("1 tokenizer", "tokenizer.ckpt", "tokenizer.yaml"),
    _stage(
        "1 baseline: per-sample-KL VAE", "kl_vae.ckpt", "tokenizer.yaml", "kl_vae/tokenizer.yaml"
    ),
    _stage("2 reference model", "reference.ckpt", "reference.yaml"),
    _stage("3 DMD alignment", "align.ckpt", "align.yaml"),
    _stage(
        "3 ablation: matching weight 0", "align_ablation.ckpt", "align.yaml", "ablation/align.yaml"
    ),
    _stage("4 decoder fine-tune", "finetune.ckpt", "finetune.yaml"),
    _stage(
        "4 fine-tune (ablation)",
        "finetune_ablation.ckpt",
        "finetune.yaml",
        "ablation/finetune.yaml",
    ),
    _stage("5 generator", "diffusion.ckpt", "diffusion.yaml"),
    _stage(
        "5 generator (ablation)",
        "diffusion_ablation.ckpt",
        "diffusion.yaml",
        "ablation/diffusion.yaml",
    ),
    _stage(
        "5 generator (KL-VAE)", "diffusion_kl_vae.ckpt", "diffusion.yaml", "kl_vae/diffusion.yaml"
    ),
)


@dataclass(frozen=True)
class Variant:
    """A row of the results table: a tokenizer checkpoint and the generator trained on it."""

    name: str
    tokenizer: str
    generator: str
    key: str  # file-name tag of the sample grid
    aligned_space: bool = True  # latents comparable with the reference (same stage-1 origin)


VARIANTS = (
    Variant(
        "stage-1 tokenizer (the reference itself)",
        f"{CKPTS}/tokenizer.ckpt",
        f"{CKPTS}/reference.ckpt",
        "stage1",
    ),
    Variant(
        "DMVAE: aligned (matching weight 10)",
        f"{CKPTS}/finetune.ckpt",
        f"{CKPTS}/diffusion.ckpt",
        "aligned",
    ),
    Variant(
        "ablation: matching weight 0",
        f"{CKPTS}/finetune_ablation.ckpt",
        f"{CKPTS}/diffusion_ablation.ckpt",
        "ablation",
    ),
    Variant(
        "baseline: per-sample-KL VAE (conv encoder)",
        f"{CKPTS}/kl_vae.ckpt",
        f"{CKPTS}/diffusion_kl_vae.ckpt",
        "kl_vae",
        aligned_space=False,
    ),
)
REFERENCE_TOKENIZER = f"{CKPTS}/tokenizer.ckpt"
REFERENCE_MODEL = f"{CKPTS}/reference.ckpt"
FID_NET = f"{CKPTS}/fid_net.ckpt"


#: What ``make demo`` trains: every stage at this fraction of the batches / steps its configs
#: name, so that the demo stays well under 10 minutes on 2 cores. Measured on 2 idle cores:
#: 13 min 20 s at 0.3 and 9 min 18 s at 0.15 with 2000 evaluation samples, 10 min 25 s at 0.15
#: with 1000 in a slower run (KL-VAE 157 s, its generator 73 s, evaluation 74 s); the configs' own
#: budgets (``--scale 1``) would take about 40 minutes, extrapolated from those runs. A demo of
#: the pipeline, not evidence: ``make study`` has that.
DEMO_SCALE = 0.1
#: Stages kept at their configs' budget whatever the scale: the domain feature net is the FID
#: instrument, and a weaker one would change what every gFID of the table means.
UNSCALED = ("fid_net.ckpt",)


def stage_budget(stage: Stage, root: Path) -> dict[str, int]:
    """The training budget the stacked configs of ``stage`` set: ``limit_train_batches`` (an
    integer: the one-epoch stages) and ``max_steps`` (> 0: the DiT stages), later files win."""
    trainer: dict[str, object] = {}
    for config in stage.configs:
        trainer.update((yaml.safe_load((root / config).read_text()) or {}).get("trainer") or {})
    budget = {}
    for key in ("limit_train_batches", "max_steps"):
        value = trainer.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            budget[key] = value
    return budget


def scaled_budget(stage: Stage, root: Path, scale: float) -> dict[str, int]:
    """:func:`stage_budget` times ``scale`` (rounded, at least 1); {} at scale 1 or for the
    :data:`UNSCALED` stages."""
    if scale == 1.0 or Path(stage.checkpoint).name in UNSCALED:
        return {}
    return {k: max(1, round(v * scale)) for k, v in stage_budget(stage, root).items()}


def run_stage(stage: Stage, root: Path, scale: float = 1.0) -> float:
    """Train ``stage`` unless its checkpoint exists, its budget scaled by ``scale`` (an overlay
    after its configs; the scale is recorded next to the checkpoint, and a checkpoint trained at
    another scale is an error rather than silently reused). A stage that was killed after an
    epoch-end save (its ``<ckpt>.running`` marker is still there) is resumed from that save
    with ``--ckpt_path``, not taken as finished. Returns the seconds spent."""
    ckpt = root / stage.checkpoint
    record = ckpt.with_suffix(".scale")
    running = ckpt.with_suffix(".running")  # there from the start of the fit to its end
    resume = ckpt.is_file() and running.is_file()
    if ckpt.is_file() and not resume:
        trained = float(record.read_text()) if record.is_file() else 1.0
        if trained != scale:
            raise RuntimeError(
                f"{ckpt} was trained at --scale {trained:g}, this run asks for {scale:g}: delete "
                f"{ckpt.parent} to retrain, or pass --scale {trained:g}"
            )
        print(f"[demo] {stage.name}: {ckpt} exists, skipping")
        return 0.0
    args = ["fit"]
    for config in stage.configs:
        args += ["--config", str(root / config)]
    budget = scaled_budget(stage, root, scale)
    if budget:
        overlay = ckpt.with_suffix(".budget.yaml")
        overlay.parent.mkdir(parents=True, exist_ok=True)
        overlay.write_text(yaml.safe_dump({"trainer": budget}))
        args += ["--config", str(overlay)]
    if resume:  # the epoch-end save of this stage, killed before it finished
        started = float(running.read_text())
        if started != scale:
            raise RuntimeError(
                f"{ckpt} is an interrupted stage started at --scale {started:g}, this run asks "
                f"for {scale:g}: pass --scale {started:g} to finish it, or delete {ckpt} and "
                f"{running} to start it again"
            )
        args += ["--ckpt_path", str(ckpt)]
        print(f"[demo] {stage.name}: resuming the interrupted stage from {ckpt}")
    print(f"[demo] {stage.name}: dmvae {' '.join(args)}")
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    running.write_text(f"{scale}\n")
    start = time.perf_counter()
    cli_main(args)
    if not ckpt.is_file():
        raise RuntimeError(f"{stage.name} finished but wrote no checkpoint at {ckpt}")
    record.write_text(f"{scale}\n")
    running.unlink()
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------- evaluation
def evaluate(root: Path, out_dir: Path, n: int = 1000, seed: int = 0) -> list[dict[str, float]]:
    """The results table's rows (see the module docstring) and PNG grids under ``out_dir``."""
    from dmvae_lightning.latents import load_frozen_tokenizer
    from dmvae_lightning.metrics import DomainFeatures, frechet_distance
    from dmvae_lightning.metrics.evaluate import psnr
    from dmvae_lightning.modules.diffusion import LatentDiffusionModule

    out_dir.mkdir(parents=True, exist_ok=True)
    features = DomainFeatures(root / FID_NET, option="the domain feature net (fid_net.yaml)")
    test_x, _ = seeded_subset(*fashion_mnist("test"), n, seed)
    train_x, _ = seeded_subset(*fashion_mnist("train"), n, seed + 1)
    real = features.stats(test_x)

    ref_state = torch.load(root / REFERENCE_MODEL, map_location="cpu", weights_only=True)
    mean = float(ref_state["state_dict"]["latent_mean"])
    scale = float(ref_state["state_dict"]["latent_scale"])
    reference = load_frozen_tokenizer(root / REFERENCE_TOKENIZER, option="reference tokenizer")
    ref_z = (in_chunks(reference.encode, train_x) - mean) * scale

    rows, rec_rows = [], [test_x[:16]]
    for variant in VARIANTS:
        tok = load_frozen_tokenizer(root / variant.tokenizer, option=variant.name)
        z = in_chunks(tok.encode, test_x)
        rec = in_chunks(lambda latents, t=tok: t.decode(latents).clamp(-1, 1), z)
        rec_rows.append(rec[:16])
        row = {"psnr": psnr(test_x, rec), "rfid": frechet_distance(features.stats(rec), real)}
        if variant.aligned_space:  # another tokenizer's latent space has no common coordinates
            row.update(latent_distances((z - mean) * scale, ref_z, seed))

        gen = LatentDiffusionModule.load_from_checkpoint(
            str(root / variant.generator), map_location="cpu", weights_only=True
        ).eval()
        classes = gen.hparams.num_classes
        labels = torch.arange(classes).repeat_interleave(math.ceil(n / classes))[:n]
        generator = torch.Generator().manual_seed(seed)
        samples = torch.cat(
            [
                gen.sample(part, generator=generator, decode=True).clamp(-1, 1)
                for part in labels.split(500)
            ]
        )
        row["gfid"] = frechet_distance(features.stats(samples), real)
        per_class = torch.cat([samples[labels == c][:10] for c in range(classes)])
        _save_grid(per_class, out_dir / f"samples_{variant.key}.png", nrow=10)
        rows.append(row)
        print(f"[demo] {variant.name}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()))
    _save_grid(torch.cat(rec_rows), out_dir / "reconstructions.png", nrow=16)
    return rows


def _save_grid(images: torch.Tensor, path: Path, nrow: int) -> None:
    grid = torchvision.utils.make_grid(images, nrow=nrow, normalize=True, value_range=(-1, 1))
    torchvision.utils.save_image(grid, path)


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
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    _save_grid(images, Path(out_path), nrow=per_class)
    return images


def results_table(
    rows: list[dict[str, float]], timings: dict[str, float], n: int, scale: float = 1.0
) -> str:
    """The markdown written to ``results.md``."""
    budget = (
        "every stage at its configs' budget"
        if scale == 1.0
        else f"every stage but the FID net at {scale:g} x its configs' batches / steps"
    )
    lines = [
        f"Fashion-MNIST test images (n = {n}); FID with the domain feature net "
        "(configs/fashion_mnist/fid_net.yaml), samples 50-step Euler, no CFG; latent distances in "
        "the reference model's normalised space against stage-1 latents of training images. "
        f"One seed, {budget}: a run of the pipeline, not evidence (`make study` has the seeds).",
        "",
        "| tokenizer | PSNR (dB) | rFID | gFID | MMD^2 to reference | SW2^2 to reference |",
        "|---|---|---|---|---|---|",
    ]
    for variant, row in zip(VARIANTS, rows, strict=True):
        dist = [f"{row[k]:.4f}" if k in row else "n/a" for k in ("mmd", "swd")]
        lines.append(
            f"| {variant.name} | {row['psnr']:.2f} | {row['rfid']:.2f} | {row['gfid']:.2f} "
            f"| {dist[0]} | {dist[1]} |"
        )
    lines += ["", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {secs:.0f} |" for name, secs in timings.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".", help="repository root (holds configs/)")
    parser.add_argument("--runs", default="runs", help="where the results table and grids go")
    parser.add_argument(
        "--eval_images",
        type=int,
        default=1000,
        help="test images, and samples per generator (default 1000: 2000 adds about a minute)",
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=DEMO_SCALE,
        help=f"fraction of each stage's configured batches / steps (default {DEMO_SCALE}; 1: "
        "the configs' budgets, ~40 minutes on 2 cores; the FID net is never scaled)",
    )
    args = parser.parse_args(argv)
    if not 0 < args.scale <= 1:
        parser.error(f"--scale must be in (0, 1], got {args.scale}")
    root = Path(args.root).resolve()
    os.chdir(root)  # the configs name their checkpoints relative to the repository root
    out_dir = root / args.runs / "fashion_mnist" / "demo"
    start = time.perf_counter()
    timings = {stage.name: run_stage(stage, root, args.scale) for stage in STAGES}
    eval_start = time.perf_counter()
    rows = evaluate(root, out_dir, n=args.eval_images)
    timings["evaluation"] = time.perf_counter() - eval_start
    timings["total"] = time.perf_counter() - start
    table = results_table(rows, timings, args.eval_images, args.scale)
    (out_dir / "results.md").write_text(table + "\n")
    print("\n" + table + "\n")
    print(f"[demo] checkpoints: {root / CKPTS}")
    print(f"[demo] TensorBoard: tensorboard --logdir {root / 'runs/fashion_mnist'}")
    print(f"[demo] grids: {out_dir}/reconstructions.png, samples_*.png")
    print(f"[demo] table: {out_dir / 'results.md'}")


if __name__ == "__main__":  # pragma: no cover
    main()
