"""Real-image statistics: image sources, ADM ``.npz`` files and a cache keyed by content.

* Image sources (:func:`image_batches`): a tensor (N, C, H, W) (float in [-1, 1] or uint8), a
  folder of image files (searched recursively, sorted by relative path), an ADM samples ``.npz``
  (``arr_0`` uint8 NHWC, as guided-diffusion's evaluator reads it), or a ``Dataset`` whose items
  are tensors, ``(image, ...)`` tuples or ``{"image": ...}`` dicts in [-1, 1].
* ADM statistics files (``.npz`` with ``mu`` (D,) and ``sigma`` (D, D), e.g.
  ``VIRTUAL_imagenet256_labeled.npz``): :func:`load_adm_stats` / :func:`save_adm_stats`, exact
  round trip (float64 arrays stored as they are).
* :class:`StatsCache`: statistics of a source stored once under ``sha256(content hash |
  extractor identity)``, so a changed image, file or network weight is a miss, never a stale hit.
* :func:`reference_stats`: all of the above behind one call.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dmvae_lightning.metrics.extractors import FeatureExtractor, file_digest
from dmvae_lightning.metrics.fid import FeatureStats

__all__ = [
    "StatsCache",
    "content_hash",
    "image_batches",
    "list_image_files",
    "load_adm_samples",
    "load_adm_stats",
    "reference_stats",
    "save_adm_samples",
    "save_adm_stats",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


# ------------------------------------------------------------------------------ ADM files
def save_adm_stats(path: str | Path, stats: FeatureStats) -> Path:
    """Write ``mu``, ``sigma`` (float64) and ``count`` to an ADM-style ``.npz``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:  # np.savez would append ".npz" to other names
        np.savez(
            handle,
            mu=stats.mu.double().cpu().numpy(),
            sigma=stats.sigma.double().cpu().numpy(),
            count=np.int64(stats.count),
        )
    return path


def load_adm_stats(path: str | Path, option: str = "reference") -> FeatureStats:
    """Read ``mu`` / ``sigma`` of an ADM reference ``.npz`` (``count`` 0 when it is absent)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{option}: statistics file {str(file)!r} does not exist")
    with np.load(file) as data:
        if "mu" not in data or "sigma" not in data:
            raise ValueError(
                f"{option}: {str(file)!r} has no `mu` / `sigma` arrays (keys: {list(data.keys())})"
            )
        mu = torch.from_numpy(np.array(data["mu"], dtype=np.float64))
        sigma = torch.from_numpy(np.array(data["sigma"], dtype=np.float64))
        count = int(data["count"]) if "count" in data else 0
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{option}: mu {tuple(mu.shape)} / sigma {tuple(sigma.shape)} misfit")
    return FeatureStats(mu, sigma, count)


def save_adm_samples(
    path: str | Path, images: np.ndarray | torch.Tensor, labels: Any | None = None
) -> Path:
    """Write samples as guided-diffusion does: ``arr_0`` uint8 (N, H, W, C) and, with labels,
    ``arr_1`` int64 (N,)."""
    images = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"ADM samples are uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    arrays = {"arr_0": images}
    if labels is not None:
        arrays["arr_1"] = np.asarray(
            labels.cpu().numpy() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    return path


def load_adm_samples(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``arr_0`` (N, H, W, C) uint8 and ``arr_1`` labels (or None) of an ADM samples file."""
    with np.load(path) as data:
        if "arr_0" not in data:
            raise ValueError(f"{str(path)!r} has no `arr_0` (ADM samples) array")
        images = torch.from_numpy(np.array(data["arr_0"]))
        labels = torch.from_numpy(np.array(data["arr_1"])) if "arr_1" in data else None
    return images, labels


# ------------------------------------------------------------------------------ image sources
def list_image_files(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted by relative path."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    files = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _read_image(path: Path, mode: str | None = None) -> torch.Tensor:
    """(C, H, W) uint8 of one file: greyscale stays 1 channel, anything else RGB; ``mode``
    ("L" / "RGB", the folder's, set by its first file) converts greyscale files to RGB in an
    RGB folder (as ImageNet's few greyscale JPEGs) and refuses colour in a greyscale one."""
    with Image.open(path) as image:
        if image.mode not in ("L", "RGB") or (mode == "RGB" and image.mode == "L"):
            image = image.convert("RGB")
        if mode == "L" and image.mode != "L":
            raise ValueError(
                f"image folder {str(path.parent)!r}: {path.name} is {image.mode} but the folder's "
                "first image is greyscale (L); convert the folder's images to one mode"
            )
        array = np.asarray(image, dtype=np.uint8)
    array = array[:, :, None] if array.ndim == 2 else array
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _folder_batches(files: list[Path], batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 batches of ``files``, all in the mode and size of the first file (see
    :func:`_read_image`); another size is an error naming the file."""
    first = _read_image(files[0])
    mode = "L" if first.shape[0] == 1 else "RGB"
    for start in range(0, len(files), batch_size):
        images = []
        for f in files[start : start + batch_size]:
            image = _read_image(f, mode)
            if image.shape[1:] != first.shape[1:]:
                raise ValueError(
                    f"image folder {str(f.parent)!r}: {f.name} is {image.shape[2]}x"
                    f"{image.shape[1]} but {files[0].name} is {first.shape[2]}x"
                    f"{first.shape[1]}; FID statistics need images of one size"
                )
            images.append(image)
        yield torch.stack(images)


def _to_signed(batch: torch.Tensor) -> torch.Tensor:
    return batch.float() / 127.5 - 1.0 if batch.dtype == torch.uint8 else batch.float()


def _item_image(item: Any) -> torch.Tensor:
    if isinstance(item, dict):
        return item["image"]
    if isinstance(item, tuple | list):
        return item[0]
    return item


def _is_npz(source: Any) -> bool:
    return isinstance(source, str | Path) and str(source).endswith(".npz")


def image_batches(source: Any, batch_size: int = 100) -> Iterator[torch.Tensor]:
    """Batches (b, C, H, W) float32 in [-1, 1] of an image source (see the module doc)."""
    if isinstance(source, torch.Tensor):
        if source.ndim != 4:
            raise ValueError(f"expected images (N, C, H, W), got {tuple(source.shape)}")
        for chunk in source.split(batch_size):
            yield _to_signed(chunk)
    elif _is_npz(source):
        images, _ = load_adm_samples(source)
        for chunk in images.split(batch_size):
            yield _to_signed(chunk.permute(0, 3, 1, 2))
    elif isinstance(source, str | Path):
        files = list_image_files(source)
        if not files:
            raise ValueError(f"no image files in {str(source)!r}")
        for batch in _folder_batches(files, batch_size):
            yield _to_signed(batch)
    elif isinstance(source, Dataset):
        for start in range(0, len(source), batch_size):
            stop = min(start + batch_size, len(source))
            yield _to_signed(torch.stack([_item_image(source[i]) for i in range(start, stop)]))
    else:
        raise TypeError(f"not an image source: {type(source).__name__}")


def content_hash(source: Any, batch_size: int = 256) -> str:
    """SHA-256 (hex) of an image source's content: tensor bytes (with dtype and shape), a
    file's bytes, a folder's relative names and bytes, or a data set's images."""
    digest = hashlib.sha256()
    if isinstance(source, torch.Tensor):
        tensor = source.detach().cpu().contiguous()
        digest.update(f"tensor|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    elif _is_npz(source):
        digest.update(f"npz|{file_digest(source, 64)}".encode())
    elif isinstance(source, str | Path):
        root = Path(source)
        for file in list_image_files(root):
            digest.update(f"file|{file.relative_to(root).as_posix()}|".encode())
            digest.update(file_digest(file, 64).encode())
    elif isinstance(source, Dataset):
        digest.update(f"dataset|{len(source)}|".encode())
        for batch in image_batches(source, batch_size):
            digest.update(batch.contiguous().numpy().tobytes())
    else:
        raise TypeError(f"not an image source: {type(source).__name__}")
    return digest.hexdigest()


# ------------------------------------------------------------------------------ the cache
def default_cache_dir() -> Path:
    """``$DMVAE_STATS_CACHE``, else ``$TORCH_HOME/dmvae_fid_stats``."""
    env = os.environ.get("DMVAE_STATS_CACHE")
    return Path(env) if env else Path(torch.hub.get_dir()).parent / "dmvae_fid_stats"


class StatsCache:
    """Feature statistics on disk, one ADM-format ``.npz`` per (content, extractor) pair.

    Args:
        root: cache folder (created on first write); default :func:`default_cache_dir`.
    """

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(content: str, identity: str) -> str:
        return hashlib.sha256(f"{content}|{identity}".encode()).hexdigest()[:32]

    def path(self, key: str) -> Path:
        return self.root / f"{key}.npz"

    def get(self, key: str) -> FeatureStats | None:
        file = self.path(key)
        if not file.is_file():
            return None
        return load_adm_stats(file, option="stats cache")

    def put(self, key: str, stats: FeatureStats) -> None:
        tmp = self.path(key).with_suffix(f".{os.getpid()}.tmp")
        save_adm_stats(tmp, stats)
        tmp.replace(self.path(key))  # atomic: concurrent ranks never read half a file

    def stats(
        self, source: Any, extractor: FeatureExtractor, batch_size: int = 100
    ) -> FeatureStats:
        """Statistics of ``source`` under ``extractor``: read from the cache, or computed once
        and stored."""
        key = self.key(content_hash(source), extractor.identity)
        cached = self.get(key)
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        stats = extractor.stats(image_batches(source, batch_size))
        self.put(key, stats)
        return stats


def reference_stats(
    reference: Any,
    extractor: FeatureExtractor | None = None,
    cache: StatsCache | str | Path | bool | None = True,
    batch_size: int = 100,
) -> FeatureStats:
    """Statistics to compare samples against.

    ``reference``: an ADM statistics ``.npz`` (``mu`` / ``sigma``: used as is, no extractor
    needed — it must come from the same network as the samples' features), or any image source
    (needs ``extractor``). ``cache``: a :class:`StatsCache`, a folder, True (default folder) or
    False / None (always compute)."""
    if _is_npz(reference):
        with np.load(reference) as data:
            has_stats = "mu" in data and "sigma" in data
        if has_stats:
            return load_adm_stats(reference)
    if extractor is None:
        raise ValueError("computing reference statistics from images needs a feature extractor")
    if cache is False or cache is None:
        return extractor.stats(image_batches(reference, batch_size))
    if not isinstance(cache, StatsCache):
        cache = StatsCache(None if cache is True else cache)
    return cache.stats(reference, extractor, batch_size)
