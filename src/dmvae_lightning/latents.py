"""Latent caches: encode a data set once with a frozen tokenizer, train diffusion models on it.

On-disk layout of a cache directory::

    latents.npy   (N, V, C, H, W) float16 or float32, memory-mapped when read; V = 2 with flips
                  (view 0: the image, view 1: its horizontal mirror), else V = 1
    labels.npy    (N,) int64
    meta.json     format version, fingerprint, what it is computed from, dtype, shapes

``meta.json`` is written last, so a cache whose encoding was interrupted is rejected. The
fingerprint is the sha256 of the canonical JSON of the cache's *identity*: the tokenizer (sha256
of the checkpoint file bytes, or of its state dict), the data set name, its length, a description
of its transforms, and whether flips are stored. Storage dtype is not part of it.

Encode from the shell (independent of the ``dmvae`` CLI)::

    python -m dmvae_lightning.latents --tokenizer_ckpt runs/fashion_mnist/checkpoints/tokenizer.ckpt \\
        --out runs/fashion_mnist/latents/train --dataset fashion_mnist --split train

Read with :class:`LatentCache`, whose items are ``{"reference": (C, H, W) float32, "label": int64}``
(the batch contract of :class:`~dmvae_lightning.modules.diffusion.LatentDiffusionModule`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dmvae_lightning.checkpoints import file_sha256, load_tokenizer, state_dict_sha256

__all__ = [
    "CACHE_FORMAT",
    "LatentCache",
    "cache_fingerprint",
    "describe_dataset",
    "encode_dataset",
    "file_sha256",
    "load_frozen_tokenizer",
    "main",
    "state_dict_sha256",
]

CACHE_FORMAT = 1
LATENTS_FILE, LABELS_FILE, META_FILE = "latents.npy", "labels.npy", "meta.json"
_DTYPES = {"float16": np.float16, "float32": np.float32}


# ---------------------------------------------------------------------------------- hashing
def cache_fingerprint(identity: dict[str, Any]) -> str:
    """Hex sha256 of ``identity`` as canonical JSON (sorted keys, no whitespace)."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def describe_dataset(dataset: Dataset) -> str:
    """Default transform description: the class name and its scalar attributes (e.g.
    ``FashionMNIST(channels=1, hflip=False, pad_to=32, split='train')``), unwrapping Subsets."""
    while hasattr(dataset, "dataset") and hasattr(dataset, "indices"):
        dataset = dataset.dataset
    scalars = {
        k: v
        for k, v in sorted(vars(dataset).items())
        if not k.startswith("_") and k != "num_skipped" and isinstance(v, bool | int | float | str)
    }
    args = ", ".join(f"{k}={v!r}" for k, v in scalars.items())
    return f"{type(dataset).__name__}({args})"


# ---------------------------------------------------------------------------------- tokenizer
def load_frozen_tokenizer(
    path: str | os.PathLike,
    option: str = "--tokenizer_ckpt",
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """The frozen :class:`~dmvae_lightning.nets.tokenizer.Tokenizer` of the DMVAEModule
    checkpoint ``path`` (EMA weights, eval mode, every parameter frozen): see
    :func:`dmvae_lightning.checkpoints.load_tokenizer`. ``option`` names the setting in error
    messages (:class:`~dmvae_lightning.checkpoints.CheckpointError`)."""
    return load_tokenizer(path, option=option, map_location=map_location)


# ---------------------------------------------------------------------------------- writing
@torch.no_grad()
def encode_dataset(
    tokenizer_module: nn.Module,
    dataset: Dataset,
    out_path: str | os.PathLike,
    batch_size: int = 64,
    flips: bool = False,
    progress: bool = True,
    dtype: str = "float16",
    num_workers: int = 0,
    tokenizer_ckpt: str | os.PathLike | None = None,
    dataset_name: str | None = None,
    transforms: str | None = None,
) -> dict[str, Any]:
    """Encode every item of ``dataset`` and write a cache directory ``out_path``.

    Args:
        tokenizer_module: module with ``encode(images (B, C_img, H, W) in [-1, 1]) -> raw
            latents (B, C, h, w)`` (e.g. from :func:`load_frozen_tokenizer`); used as is (put
            its EMA weights in first), in eval mode, on its own device.
        dataset: items ``{"image": (C_img, H, W), "label": int64}`` with deterministic
            transforms (random crops / flips would be frozen into the cache).
        out_path: directory to create or overwrite.
        batch_size, num_workers: of the (unshuffled) DataLoader.
        flips: also store the latent of each horizontally mirrored image.
        progress: show a tqdm bar.
        dtype: ``"float16"`` (half the disk) or ``"float32"`` (exact) storage.
        tokenizer_ckpt: file whose bytes identify the tokenizer; default: hash its state dict.
        dataset_name, transforms: identity of the data (defaults: class name,
            :func:`describe_dataset`).

    Returns:
        The metadata written to ``meta.json`` (``meta["fingerprint"]`` is the fingerprint).
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
    if getattr(dataset, "hflip", False):
        warnings.warn(
            "encode_dataset: the data set flips images at random; use flips=True instead",
            stacklevel=2,
        )
    out = Path(out_path)
    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILE).unlink(missing_ok=True)  # the cache is invalid until the end
    identity = {
        "tokenizer_sha256": (
            file_sha256(tokenizer_ckpt) if tokenizer_ckpt else state_dict_sha256(tokenizer_module)
        ),
        "dataset": dataset_name or type(dataset).__name__,
        "num_items": len(dataset),
        "transforms": transforms or describe_dataset(dataset),
        "flips": bool(flips),
    }
    tokenizer_module.eval()
    param = next(tokenizer_module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    views = 2 if flips else 1
    n = len(dataset)
    latents_tmp, labels_tmp = out / (LATENTS_FILE + ".partial"), out / (LABELS_FILE + ".partial")
    latents: np.memmap | None = None
    labels = np.empty(n, dtype=np.int64)
    start = 0
    for batch in tqdm(loader, desc="encode", disable=not progress):
        images = batch["image"].to(device)
        b = images.shape[0]
        inputs = torch.cat([images, images.flip(-1)]) if flips else images
        z = tokenizer_module.encode(inputs).float().cpu()
        z = torch.stack(z.chunk(views), dim=1)  # (B, V, C, h, w)
        if latents is None:
            latents = np.lib.format.open_memmap(
                latents_tmp, mode="w+", dtype=_DTYPES[dtype], shape=(n, *z.shape[1:])
            )
        latents[start : start + b] = z.numpy().astype(_DTYPES[dtype])
        labels[start : start + b] = batch["label"].numpy()
        start += b
    if latents is None or start != n:
        raise RuntimeError(f"encoded {start} of {n} items; is the data set empty?")
    latents.flush()
    shape = list(latents.shape)
    del latents
    with open(labels_tmp, "wb") as f:  # a file object: np.save adds no ".npy" suffix
        np.save(f, labels, allow_pickle=False)
    os.replace(latents_tmp, out / LATENTS_FILE)
    os.replace(labels_tmp, out / LABELS_FILE)
    meta = {
        "format": CACHE_FORMAT,
        "fingerprint": cache_fingerprint(identity),
        "identity": identity,
        "dtype": dtype,
        "num_items": n,
        "views": views,
        "latent_shape": shape[2:],
        "num_classes": int(labels.max()) + 1,
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return meta


# ---------------------------------------------------------------------------------- reading
class LatentCache(Dataset):
    """Items ``{key: latent (C, H, W) float32, "label": int64 scalar}`` of a cache directory.

    With flips stored and ``random_view``, each access returns one of the two views at random
    (torch's global RNG, which DataLoader workers seed per worker; not replayed exactly on
    resume); otherwise always view 0 (the unflipped images). The latents file is memory-mapped
    lazily in each process, so worker processes do not copy it.

    Args:
        path: cache directory written by :func:`encode_dataset`.
        expected_fingerprint: when given, must equal the cache's fingerprint.
        key: batch key of the latents (``"reference"``: what LatentDiffusionModule reads).
        random_view: draw the view at random (training with ``hflip``); False: view 0 always
            (validation, or training without flips).

    Raises:
        FileNotFoundError: not a (complete) cache.
        ValueError: fingerprint or format mismatch.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        expected_fingerprint: str | None = None,
        key: str = "reference",
        random_view: bool = True,
    ) -> None:
        self.path = Path(path)
        self.random_view = bool(random_view)
        meta_file = self.path / META_FILE
        if not meta_file.is_file():
            raise FileNotFoundError(
                f"{str(self.path)!r} is not a complete latent cache (no {META_FILE}); encode it "
                "with `python -m dmvae_lightning.latents --tokenizer_ckpt ... --out ...`."
            )
        self.meta: dict[str, Any] = json.loads(meta_file.read_text())
        if self.meta.get("format") != CACHE_FORMAT:
            raise ValueError(
                f"latent cache {str(self.path)!r} has format {self.meta.get('format')!r}, this "
                f"version reads {CACHE_FORMAT}; re-encode it."
            )
        if expected_fingerprint is not None and expected_fingerprint != self.fingerprint:
            raise ValueError(
                f"latent cache {str(self.path)!r} has fingerprint {self.fingerprint} but "
                f"{expected_fingerprint} was expected: it was made from another tokenizer, data "
                f"set or transform ({self.meta['identity']}). Re-encode it or fix the expected "
                "fingerprint."
            )
        self.key = key
        self.labels = torch.from_numpy(np.load(self.path / LABELS_FILE, allow_pickle=False))
        self.views = int(self.meta["views"])
        self.latent_shape = tuple(self.meta["latent_shape"])
        self._latents: np.ndarray | None = None

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    def check_tokenizer(self, tokenizer_ckpt: str | os.PathLike, option: str = "tokenizer_ckpt"):
        """Raise ValueError unless the cache was encoded by the checkpoint file ``tokenizer_ckpt``
        (caches written without ``tokenizer_ckpt`` hold a state-dict hash and never match)."""
        stored = self.meta["identity"]["tokenizer_sha256"]
        if file_sha256(tokenizer_ckpt) != stored:
            raise ValueError(
                f"{option}: {str(tokenizer_ckpt)!r} is not the tokenizer that encoded the latent "
                f"cache {str(self.path)!r}; re-encode the cache or use the matching checkpoint."
            )

    def as_tensors(self, view: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole cache at once: latents (N, C, H, W) float32 of stored view ``view`` (0: the
        unflipped images) and labels (N,) int64, in the encoded data set's order."""
        if not 0 <= view < self.views:
            raise ValueError(f"latent cache {str(self.path)!r} stores {self.views} view(s)")
        latents = np.array(self._array()[:, view], dtype=np.float32)  # one copy, out of the map
        return torch.from_numpy(latents), self.labels.clone()

    def _array(self) -> np.ndarray:
        if self._latents is None:
            self._latents = np.load(self.path / LATENTS_FILE, mmap_mode="r", allow_pickle=False)
        return self._latents

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_latents"] = None  # re-opened in the worker instead of pickling the data
        return state

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        view = int(torch.randint(self.views, ())) if self.random_view and self.views > 1 else 0
        latent = np.array(self._array()[index, view], dtype=np.float32)
        return {self.key: torch.from_numpy(latent), "label": self.labels[index].clone()}


# ---------------------------------------------------------------------------------- CLI
def _build_dataset(args: argparse.Namespace) -> tuple[Dataset, str]:
    from torch.utils.data import Subset

    from dmvae_lightning.data.images import build_image_dataset

    if args.dataset == "fashion_mnist":
        kwargs: dict[str, Any] = dict(
            root=args.root, channels=args.channels, pad_to=args.image_size, hflip=False
        )
    elif args.dataset == "image_folder":
        # a cache wants the deterministic centre crop; flips are stored separately (--flips)
        kwargs = dict(
            root=args.root,
            image_size=args.image_size,
            channels=args.channels,
            hflip=False,
            crop="center",
        )
    else:
        kwargs = dict(
            num_samples=args.synthetic_size,
            channels=args.channels,
            image_size=args.image_size,
            num_classes=args.num_classes,
            seed=args.seed,
        )
    dataset = build_image_dataset(args.dataset, args.split, **kwargs)
    description = describe_dataset(dataset)
    if args.limit is not None:
        dataset = Subset(dataset, range(min(args.limit, len(dataset))))
    return dataset, description


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python -m dmvae_lightning.latents``: encode a data set split into a latent cache."""
    parser = argparse.ArgumentParser(
        prog="python -m dmvae_lightning.latents", description=main.__doc__
    )
    parser.add_argument("--tokenizer_ckpt", required=True, help="DMVAEModule checkpoint")
    parser.add_argument("--out", required=True, help="cache directory to write")
    parser.add_argument(
        "--dataset", default="fashion_mnist", choices=("fashion_mnist", "image_folder", "synthetic")
    )
    parser.add_argument("--root", default=None, help="data folder (default: Debian FMNIST)")
    parser.add_argument("--split", default="train", choices=("train", "val"))
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--num_classes", type=int, default=10, help="synthetic data only")
    parser.add_argument("--synthetic_size", type=int, default=512, help="synthetic data only")
    parser.add_argument("--seed", type=int, default=0, help="synthetic data only")
    parser.add_argument("--limit", type=int, default=None, help="encode only the first N items")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--flips", action="store_true", help="also store mirrored latents")
    parser.add_argument("--dtype", default="float16", choices=tuple(_DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)
    tokenizer = load_frozen_tokenizer(args.tokenizer_ckpt).to(args.device)
    made = tokenizer.decoder.out_channels  # the images' channels (load_tokenizer's Decoder)
    if made != args.channels:
        parser.error(
            f"--channels is {args.channels} but the tokenizer of --tokenizer_ckpt works on "
            f"{made}-channel images: set --channels {made}"
        )
    dataset, description = _build_dataset(args)
    name = f"{args.dataset}:{args.split}"
    meta = encode_dataset(
        tokenizer,
        dataset,
        args.out,
        batch_size=args.batch_size,
        flips=args.flips,
        progress=not args.no_progress,
        dtype=args.dtype,
        num_workers=args.num_workers,
        tokenizer_ckpt=args.tokenizer_ckpt,
        dataset_name=name,
        transforms=description,
    )
    print(f"wrote {meta['num_items']} latents {meta['latent_shape']} to {args.out}")
    print(f"fingerprint {meta['fingerprint']}")
    return meta


if __name__ == "__main__":  # pragma: no cover
    main()
