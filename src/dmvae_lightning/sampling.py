"""Sampling for evaluation: N class-balanced samples as PNGs and an ADM ``samples.npz``.

    python -m dmvae_lightning.sampling --ckpt runs/imagenet/checkpoints/diffusion.ckpt \\
        --num_samples 50000 --out runs/imagenet/samples --steps 250 --sampler sde --cfg 1.0
    torchrun --nproc_per_node 8 -m dmvae_lightning.sampling --ckpt ... --out ...   # 8 ranks

Sample ``i`` has label ``i % num_classes`` (the null class for unconditional models) and its own
initial noise, seeded by ``(seed, i)``. Indices are cut into blocks of ``batch_size``; block ``b``
is drawn in one batch (its SDE noise seeded by ``(seed, b)``) by rank ``b % world_size``. So the
samples depend on ``(checkpoint, seed, batch_size, steps, ...)`` only — not on the number of ranks
and not on interruptions: ``images/{i:06d}.png`` files already written are skipped (a PNG is
written under a temporary name and renamed, so a killed run leaves no half file), and a block
with some files missing is drawn again and only the missing ones are written. The settings are
stored in ``sampling.json`` (with the sha256 of the checkpoint and tokenizer files, so an
overwritten ``last.ckpt`` counts as another checkpoint); resuming with other settings is an
error.

At the end (after a barrier when ranks share a process group, e.g. under ``torchrun``) rank 0
packs ``samples.npz``: ``arr_0`` uint8 (N, H, W, C) and ``arr_1`` labels, the format
guided-diffusion's evaluator and :mod:`dmvae_lightning.metrics.evaluate` read. Without a process
group each rank only writes its blocks; run once more with ``--pack_only``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from dmvae_lightning.checkpoints import file_sha256
from dmvae_lightning.metrics.extractors import to_uint8
from dmvae_lightning.metrics.stats import save_adm_samples
from dmvae_lightning.utils.rng import step_seed

__all__ = [
    "DiffusionGenerator",
    "balanced_labels",
    "blocks_of_rank",
    "main",
    "pack_samples",
    "sample_path",
    "write_samples",
]

_BLOCK_SALT = 0xB10C_5EED  # separates block (SDE) seeds from per-sample noise seeds

Generate = Callable[[torch.Tensor, Sequence[int], int], torch.Tensor]
"""``generate(labels (B,), noise_seeds [B], block_seed) -> images (B, C, H, W) in [-1, 1]``."""


def balanced_labels(indices: torch.Tensor | Sequence[int], num_classes: int) -> torch.Tensor:
    """Label ``i % num_classes`` of each sample index (all 0 when ``num_classes`` is 0)."""
    indices = torch.as_tensor(indices, dtype=torch.long)
    return indices % num_classes if num_classes > 0 else torch.zeros_like(indices)


def blocks_of_rank(num_samples: int, batch_size: int, rank: int, world_size: int) -> list[range]:
    """The index blocks ``[b * batch_size, (b + 1) * batch_size)`` with ``b % world_size ==
    rank``: disjoint across ranks, together covering ``range(num_samples)``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
    starts = range(0, num_samples, batch_size)
    return [
        range(start, min(start + batch_size, num_samples))
        for block, start in enumerate(starts)
        if block % world_size == rank
    ]


def sample_path(out: str | Path, index: int) -> Path:
    return Path(out) / "images" / f"{index:06d}.png"


def _save_png(image: torch.Tensor, path: Path) -> None:
    pixels = to_uint8(image).permute(1, 2, 0).cpu().numpy()
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.png")
    Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels).save(tmp)
    tmp.replace(path)


def _check_manifest(out: Path, settings: dict[str, Any]) -> None:
    file = out / "sampling.json"
    if file.is_file():
        old = json.loads(file.read_text())
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            raise ValueError(
                f"{file} was written with other settings {diff} (old, new): resuming would mix "
                "samples. Use another --out or the same settings."
            )
        return
    tmp = file.with_name(f".sampling.{os.getpid()}.json")
    tmp.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    tmp.replace(file)


def write_samples(
    generate: Generate,
    num_samples: int,
    out: str | Path,
    num_classes: int,
    batch_size: int = 64,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    settings: dict[str, Any] | None = None,
    progress: bool = True,
) -> list[int]:
    """Write this rank's missing samples as ``out/images/{i:06d}.png``; returns the indices
    written. ``settings`` (with ``num_samples``, ``num_classes``, ``seed``, ``batch_size``) are
    checked against ``out/sampling.json`` by every rank."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    base = {"num_samples": num_samples, "num_classes": num_classes, "seed": seed}
    _check_manifest(out, {**base, "batch_size": batch_size, **(settings or {})})
    written: list[int] = []
    blocks = blocks_of_rank(num_samples, batch_size, rank, world_size)
    bar = tqdm(blocks, desc=f"sampling (rank {rank})", disable=not progress, position=rank)
    for block in bar:
        missing = [i for i in block if not sample_path(out, i).is_file()]
        if not missing:
            continue
        labels = balanced_labels(block, num_classes)
        noise_seeds = [step_seed(seed, i) for i in block]
        block_seed = step_seed(seed ^ _BLOCK_SALT, block.start // batch_size)
        images = generate(labels, noise_seeds, block_seed)
        if images.shape[0] != len(block):
            raise RuntimeError(f"generate returned {images.shape[0]} images for {len(block)}")
        for i in missing:
            _save_png(images[i - block.start], sample_path(out, i))
            written.append(i)
    return written


def pack_samples(out: str | Path, num_samples: int | None = None) -> Path:
    """Pack ``out/images/{i:06d}.png`` for i < N into ``out/samples.npz`` (ADM format; labels
    from ``sampling.json``). Fails naming the first missing index."""
    out = Path(out)
    settings = json.loads((out / "sampling.json").read_text())
    n = settings["num_samples"] if num_samples is None else num_samples
    missing = [i for i in range(n) if not sample_path(out, i).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {n} samples missing in {out / 'images'} (first: {missing[0]}); "
            "run the sampling again (it resumes)."
        )
    first = np.asarray(Image.open(sample_path(out, 0)))
    images = np.empty((n, first.shape[0], first.shape[1], 1 if first.ndim == 2 else 3), np.uint8)
    for i in range(n):
        with Image.open(sample_path(out, i)) as image:
            array = np.asarray(image)
        images[i] = array[:, :, None] if array.ndim == 2 else array
    labels = balanced_labels(range(n), settings["num_classes"])
    return save_adm_samples(out / "samples.npz", images, labels)


class DiffusionGenerator:
    """``generate`` for :func:`write_samples` from a
    :class:`~dmvae_lightning.modules.diffusion.LatentDiffusionModule` with a tokenizer: decoded
    samples (EMA weights) with the given sampler settings (None = the module's defaults)."""

    def __init__(
        self,
        module: Any,
        steps: int | None = None,
        cfg: float | None = None,
        sampler: str | None = None,
        shift: float | None = None,
    ) -> None:
        if module.tokenizer is None:
            raise ValueError(
                "sampling images needs a tokenizer: the checkpoint has no "
                "model.init_args.tokenizer_ckpt; pass --tokenizer_ckpt."
            )
        self.module = module.eval()
        self.kwargs = {"steps": steps, "cfg": cfg, "sampler": sampler, "shift": shift}

    @property
    def num_classes(self) -> int:
        return int(self.module.hparams.num_classes)

    @torch.no_grad()
    def __call__(
        self, labels: torch.Tensor, noise_seeds: Sequence[int], block_seed: int
    ) -> torch.Tensor:
        shape = tuple(int(s) for s in self.module.hparams.latent_shape)
        noise = torch.stack(
            [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in noise_seeds]
        )
        if self.num_classes == 0:
            labels = torch.full_like(labels, self.module.dit.null_class)
        generator = torch.Generator().manual_seed(block_seed)
        images = self.module.sample(
            labels, noise=noise, generator=generator, decode=True, **self.kwargs
        )
        return images.clamp(-1, 1).float().cpu()


def _distributed_env() -> tuple[int, int]:
    for rank_key, size_key in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank_key in os.environ and size_key in os.environ:
            return int(os.environ[rank_key]), int(os.environ[size_key])
    return 0, 1


def load_module(ckpt: str, module: str, tokenizer_ckpt: str | None, device: str) -> Any:
    """The LightningModule class ``module`` (import path) loaded from ``ckpt`` on ``device``."""
    if not Path(ckpt).is_file():
        raise FileNotFoundError(f"--ckpt: checkpoint {ckpt!r} does not exist")
    module_path, _, class_name = module.rpartition(".")
    cls = getattr(importlib.import_module(module_path), class_name)
    overrides = {"tokenizer_ckpt": tokenizer_ckpt} if tokenizer_ckpt else {}
    model = cls.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True, **overrides)
    return model.to(device).eval()


def main(argv: list[str] | None = None) -> Path | None:
    parser = argparse.ArgumentParser(
        prog="python -m dmvae_lightning.sampling", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--ckpt", help="LatentDiffusionModule checkpoint (generator)")
    parser.add_argument("--out", required=True, help="output folder (images/, samples.npz)")
    parser.add_argument("--num_samples", type=int, default=50000)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--steps", type=int, help="default: the module's sample_steps")
    parser.add_argument("--cfg", type=float, help="guidance scale (default: sample_cfg)")
    parser.add_argument("--sampler", choices=("euler", "heun", "sde"))
    parser.add_argument("--shift", type=float, help="time shift (default: sample_shift)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer_ckpt", help="override the checkpoint's tokenizer_ckpt")
    parser.add_argument(
        "--module", default="dmvae_lightning.modules.diffusion.LatentDiffusionModule"
    )
    parser.add_argument("--device", help="default: cuda:LOCAL_RANK when available, else cpu")
    parser.add_argument("--rank", type=int, help="default: $RANK or $SLURM_PROCID, else 0")
    parser.add_argument("--world_size", type=int, help="default: $WORLD_SIZE / $SLURM_NTASKS")
    parser.add_argument("--pack_only", action="store_true", help="only pack samples.npz")
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)
    if args.pack_only:
        path = pack_samples(args.out)
        print(f"wrote {path}")
        return path
    if not args.ckpt:
        parser.error("--ckpt is required (unless --pack_only)")
    env_rank, env_world = _distributed_env()
    rank = env_rank if args.rank is None else args.rank
    world_size = env_world if args.world_size is None else args.world_size
    device = args.device
    if device is None:
        local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    module = load_module(args.ckpt, args.module, args.tokenizer_ckpt, device)
    generate = DiffusionGenerator(module, args.steps, args.cfg, args.sampler, args.shift)
    hp = module.hparams
    tokenizer = getattr(hp, "tokenizer_ckpt", None)
    settings = {
        "ckpt": str(Path(args.ckpt).resolve()),
        # the files' contents, not only their paths: a resume after last.ckpt was overwritten,
        # or with another tokenizer, would mix two models' samples
        "ckpt_sha256": file_sha256(args.ckpt),
        "module": args.module,
        "tokenizer_sha256": file_sha256(tokenizer)
        if tokenizer and Path(tokenizer).is_file()
        else None,
        "steps": args.steps or hp.sample_steps,
        "cfg": hp.sample_cfg if args.cfg is None else args.cfg,
        "sampler": args.sampler or hp.sampler,
        "shift": hp.sample_shift if args.shift is None else args.shift,
    }
    write_samples(
        generate,
        args.num_samples,
        args.out,
        generate.num_classes,
        batch_size=args.batch_size,
        rank=rank,
        world_size=world_size,
        seed=args.seed,
        settings=settings,
        progress=not args.no_progress,
    )
    dist = torch.distributed
    grouped = world_size > 1 and dist.is_available() and "MASTER_ADDR" in os.environ
    if grouped:
        if not dist.is_initialized():
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
        dist.barrier()
    path = None
    if rank == 0 and (world_size == 1 or grouped):
        path = pack_samples(args.out, args.num_samples)
        print(f"wrote {path}")
    elif world_size > 1 and not grouped and rank == 0:
        print("ranks share no process group: pack with --pack_only once every rank is done")
    if grouped:
        dist.barrier()
        dist.destroy_process_group()
    return path


if __name__ == "__main__":  # pragma: no cover
    main()
