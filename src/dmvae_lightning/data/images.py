"""Image data sets: Fashion-MNIST (offline, from idx files), ImageNet-style folders, synthetic.

Every data set here returns items ``{"image": image, "label": label}`` where ``image`` is a
float32 tensor of shape ``(C, H, W)`` with values in ``[-1, 1]`` (pixel 0 -> -1, pixel 255 -> 1)
and ``label`` is an int64 scalar tensor holding the class index.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

FASHION_MNIST_DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
"""Where the Debian package ``dataset-fashion-mnist`` installs the idx ``.gz`` files."""

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
"""File name endings (compared case-insensitively) that `ImageFolderDataset` treats as images."""


def to_signed_unit(pixels: torch.Tensor) -> torch.Tensor:
    """Map uint8 pixels ``[0, 255]`` to float32 ``[-1, 1]`` exactly (0 -> -1, 255 -> 1)."""
    return pixels.to(torch.float32) / 127.5 - 1.0


def _sample_item(image: torch.Tensor, label: int) -> dict[str, torch.Tensor]:
    return {"image": image, "label": torch.tensor(label, dtype=torch.int64)}


# --------------------------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------------------------

_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file of unsigned bytes (``.gz`` or plain) into a uint8 array.

    The idx header is two zero bytes, a type code (0x08 = uint8), the number of dimensions,
    then one big-endian int32 per dimension.

    Raises:
        ValueError: the file is not a uint8 idx file or its size disagrees with its header.
    """
    path = str(path)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an idx file (bad magic number {raw[:4].hex()})")
    if raw[2] != 0x08:
        raise ValueError(f"{path}: idx type code 0x{raw[2]:02x}, expected 0x08 (unsigned byte)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    if len(raw) - header != math.prod(shape):
        raise ValueError(
            f"{path}: header says shape {shape} ({math.prod(shape)} bytes) but "
            f"{len(raw) - header} data bytes follow; the file is truncated or corrupt"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


@lru_cache(maxsize=4)
def _idx_tensor(path: str) -> torch.Tensor:
    """`read_idx` as a tensor, cached per path and shared by every data set: never write to it."""
    return torch.from_numpy(read_idx(path))


def _find_idx_pair(directory: Path, split: str) -> tuple[Path, Path] | None:
    """Return (images, labels) paths for ``split`` in ``directory`` (``.gz`` or plain), if any."""
    found = []
    for stem in _FASHION_MNIST_FILES[split]:
        candidates = [directory / f"{stem}.gz", directory / stem]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            return None
        found.append(hit)
    return found[0], found[1]


def _fashion_mnist_cache_dir() -> Path:
    """Download cache of the torchvision fallback: ``$TORCH_HOME/datasets``."""
    return Path(torch.hub.get_dir()).parent / "datasets"


def locate_fashion_mnist(root: str | os.PathLike | None, split: str) -> tuple[Path, Path]:
    """Find the idx files of a Fashion-MNIST split, downloading them only as a last resort.

    Looks in ``root`` (default `FASHION_MNIST_DEFAULT_ROOT`) and in torchvision's layout
    ``root/FashionMNIST/raw``; then in the cache ``$TORCH_HOME/datasets/FashionMNIST/raw``;
    then asks ``torchvision.datasets.FashionMNIST(download=True)`` to fill that cache.

    Raises:
        FileNotFoundError: nothing found and the download failed (e.g. offline).
    """
    base = Path(root) if root is not None else Path(FASHION_MNIST_DEFAULT_ROOT)
    cache = _fashion_mnist_cache_dir()
    search = [base, base / "FashionMNIST" / "raw", cache / "FashionMNIST" / "raw"]
    for directory in search:
        pair = _find_idx_pair(directory, split)
        if pair is not None:
            return pair
    try:
        from torchvision.datasets import FashionMNIST as TorchvisionFashionMNIST

        log.warning("Fashion-MNIST not found under %s; downloading it into %s", base, cache)
        TorchvisionFashionMNIST(str(cache), train=(split == "train"), download=True)
    except Exception as err:  # any download failure ends in the same advice
        raise FileNotFoundError(
            f"Fashion-MNIST idx files for split '{split}' not found in "
            f"{', '.join(str(d) for d in search)} and the download failed ({err!r}). "
            "Install the Debian package `dataset-fashion-mnist` (apt-get install "
            "dataset-fashion-mnist) or set `data.init_args.root` to a folder holding "
            "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz "
            "and t10k-labels-idx1-ubyte.gz."
        ) from err
    pair = _find_idx_pair(cache / "FashionMNIST" / "raw", split)
    if pair is None:
        raise FileNotFoundError(
            f"torchvision reported a Fashion-MNIST download into {cache} but the idx files are "
            "not there; set `data.init_args.root` to a folder holding them."
        )
    return pair


class FashionMNIST(Dataset):
    """Fashion-MNIST read straight from its idx files, held in memory as one uint8 tensor.

    Items: ``image`` float32 ``(channels, pad_to, pad_to)`` in ``[-1, 1]`` (the 28x28 digit
    centred, border = -1, i.e. black), ``label`` int64 in ``[0, 10)`` (see `CLASSES`).

    Args:
        root: folder with the four idx files (``.gz`` or plain); None = the Debian location.
        split: ``"train"`` (60 000 images) or ``"test"`` (10 000 images, 1000 per class).
        channels: 1, or 3 to repeat the grey channel (for networks built for RGB).
        pad_to: output side, >= 28; the zero padding is split evenly (extra pixel right/bottom).
        hflip: flip each image horizontally with probability 1/2 (uses torch's global RNG,
            which DataLoader workers seed per worker).
    """

    CLASSES = (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    )
    SIZE = 28

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str = "train",
        channels: int = 1,
        pad_to: int = 32,
        hflip: bool = False,
    ) -> None:
        if split not in _FASHION_MNIST_FILES:
            raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
        if channels not in (1, 3):
            raise ValueError(
                f"Fashion-MNIST channels must be 1 or 3 (`data.init_args.channels`), got {channels}"
            )
        if pad_to < self.SIZE:
            raise ValueError(
                f"Fashion-MNIST images are 28x28; the output size (`data.init_args.image_size`) "
                f"must be >= 28, got {pad_to}"
            )
        self.split = split
        self.channels = channels
        self.pad_to = pad_to
        self.hflip = hflip
        images_path, labels_path = locate_fashion_mnist(root, split)
        images = _idx_tensor(str(images_path))  # shared cache: read only
        labels = _idx_tensor(str(labels_path))
        if images.ndim != 3 or images.shape[1:] != (self.SIZE, self.SIZE) or labels.ndim != 1:
            raise ValueError(
                f"{images_path} / {labels_path}: expected images (N, 28, 28) and labels (N,), "
                f"got {tuple(images.shape)} and {tuple(labels.shape)}"
            )
        if len(images) != len(labels):
            raise ValueError(
                f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels"
            )
        self.images = images  # uint8 (N, 28, 28), shared with other instances: read only
        self.labels = labels.long()  # int64 (N,)
        before = (pad_to - self.SIZE) // 2
        self._padding = (before, pad_to - self.SIZE - before, before, pad_to - self.SIZE - before)

    @property
    def classes(self) -> list[str]:
        return list(self.CLASSES)

    def __len__(self) -> int:
        return len(self.labels)

    def as_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split at once: images (N, channels, pad_to, pad_to) float32 in [-1, 1] and
        labels (N,) int64, equal to stacking every item (without ``hflip``); one vectorised pass
        instead of N ``__getitem__`` calls."""
        pixels = F.pad(self.images, self._padding, value=0)
        images = to_signed_unit(pixels).unsqueeze(1).expand(-1, self.channels, -1, -1)
        return images.contiguous(), self.labels.clone()

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        pixels = self.images[index]
        if self.hflip and torch.rand(()) < 0.5:
            pixels = pixels.flip(-1)
        pixels = F.pad(pixels, self._padding, value=0)  # black border, still uint8
        image = to_signed_unit(pixels).unsqueeze(0).expand(self.channels, -1, -1).contiguous()
        return {"image": image, "label": self.labels[index].clone()}


# --------------------------------------------------------------------------------------------
# ImageNet-style folders
# --------------------------------------------------------------------------------------------


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    """Bicubic (antialiased, PIL) resize so that ``min(width, height) == size``."""
    w, h = image.size
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    return image if new == (w, h) else image.resize(new, resample=Image.BICUBIC)


def adm_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """ADM's evaluation crop: halve with BOX filtering while the short side is >= ``2 * size``,
    bicubic-resize so the short side equals ``size``, then take the centred ``size`` square.

    Returns a uint8 array ``(size, size)`` or ``(size, size, 3)`` (PIL layout).
    """
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    array = np.asarray(image)
    top = (array.shape[0] - size) // 2
    left = (array.shape[1] - size) // 2
    return array[top : top + size, left : left + size]


def random_crop_flip(image: Image.Image, size: int, hflip: bool) -> np.ndarray:
    """Training crop: resize short side to ``size``, random ``size`` square, random h-flip.

    Randomness comes from torch's global RNG (seeded per DataLoader worker). Returns uint8
    ``(size, size[, 3])``.
    """
    array = np.asarray(resize_short_side(image, size))
    top = int(torch.randint(array.shape[0] - size + 1, ()))
    left = int(torch.randint(array.shape[1] - size + 1, ()))
    array = array[top : top + size, left : left + size]
    if hflip and torch.rand(()) < 0.5:
        array = array[:, ::-1]
    return array


class ImageFolderDataset(Dataset):
    """Class-per-folder images (ImageNet layout ``root/<split>/<class>/<file>``).

    Classes are the sub-folder names of ``root/<split>`` in sorted order, mapped to 0, 1, ...;
    files are found recursively and kept sorted. Paths are held as one numpy bytes array so
    DataLoader workers do not copy a million Python strings.

    Items: ``image`` float32 ``(channels, image_size, image_size)`` in ``[-1, 1]``, ``label``
    int64. Transforms (the paper's): ``split="train"`` resizes the short side to
    ``image_size`` (bicubic), takes a random square crop and a random horizontal flip (if
    ``hflip``); any other split uses `adm_center_crop`.

    Args:
        root: data root holding one folder per split.
        split: ``"train"`` or ``"val"`` (any folder name works; only "train" is random).
        image_size: output side in pixels.
        channels: 3 (RGB) or 1 (grey, PIL "L").
        skip_bad_images: on an unreadable file, log it, count it in ``num_skipped`` and return
            the next readable image (index + 1, wrapping) instead of raising. With DataLoader
            workers each worker counts its own copy.
        hflip: random horizontal flip of training crops.
        crop: ``"random"`` (resize + random crop + flip) or ``"center"`` (ADM centre crop);
            default random for ``split="train"``, centre otherwise. Latent caches encode the
            training split with ``"center"`` and store flips separately.

    Raises:
        FileNotFoundError: ``root/<split>`` missing, or no class folder with images in it.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        image_size: int = 256,
        channels: int = 3,
        skip_bad_images: bool = False,
        hflip: bool = True,
        crop: str | None = None,
    ) -> None:
        if crop not in (None, "random", "center"):
            raise ValueError(f"crop must be 'random', 'center' or None, got {crop!r}")
        if channels not in (1, 3):
            raise ValueError(f"`data.init_args.channels` must be 1 or 3, got {channels}")
        if image_size < 1:
            raise ValueError(f"`data.init_args.image_size` must be >= 1, got {image_size}")
        self.root = Path(root)
        self.split = split
        self.image_size = image_size
        self.channels = channels
        self.skip_bad_images = skip_bad_images
        self.hflip = hflip
        self.crop = crop or ("random" if split == "train" else "center")
        self.num_skipped = 0
        self.split_dir = self.root / split
        if not self.split_dir.is_dir():
            present = sorted(p.name for p in self.root.iterdir()) if self.root.is_dir() else None
            raise FileNotFoundError(
                f"Image folder split '{split}' not found: {self.split_dir} is not a directory "
                + (
                    f"(root {self.root} holds {present[:10]}). "
                    if present is not None
                    else f"(root {self.root} does not exist). "
                )
                + "Set `data.init_args.root` to a folder laid out as <root>/<split>/<class>/<image>."
            )
        self.classes, self.paths, labels = self._scan(self.split_dir)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.labels = torch.from_numpy(labels)

    @staticmethod
    def _scan(split_dir: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
        classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
        paths: list[bytes] = []
        labels: list[int] = []
        for index, name in enumerate(classes):
            class_dir = split_dir / name
            found = []
            for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
                dirnames.sort()
                rel = os.path.relpath(dirpath, split_dir)
                found.extend(
                    os.fsencode(os.path.join(rel, f))
                    for f in sorted(filenames)
                    if f.lower().endswith(IMAGE_EXTENSIONS)
                )
            paths.extend(found)
            labels.extend([index] * len(found))
        if not paths:
            raise FileNotFoundError(
                f"No images found under {split_dir} (looked for {', '.join(IMAGE_EXTENSIONS)} in "
                f"class sub-folders; found {len(classes)} class folders). Set "
                "`data.init_args.root` to a folder laid out as <root>/<split>/<class>/<image>."
            )
        return classes, np.array(paths, dtype=np.bytes_), np.array(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, index: int) -> Path:
        """Absolute path of item ``index``."""
        return self.split_dir / os.fsdecode(self.paths[index])

    def _load(self, index: int) -> Image.Image:
        path = self.path(index)
        try:
            with Image.open(path) as image:
                return image.convert("RGB" if self.channels == 3 else "L")  # decodes fully
        except Exception as err:  # PIL raises many types (OSError, SyntaxError, bomb, ...)
            raise RuntimeError(
                f"Cannot read image {path}: {err!r}. Remove or replace the file, or set "
                "`data.init_args.skip_bad_images: true` to skip unreadable images."
            ) from err

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = int(index)
        for attempt in range(len(self)):
            current = (index + attempt) % len(self)
            try:
                image = self._load(current)
                break
            except RuntimeError as err:
                if not self.skip_bad_images:
                    raise
                self.num_skipped += 1
                log.warning("Skipping unreadable image (%s)", err.__cause__)
        else:
            raise RuntimeError(f"No readable image in {self.split_dir} (all {len(self)} failed)")
        if self.crop == "random":
            array = random_crop_flip(image, self.image_size, self.hflip)
        else:
            array = adm_center_crop(image, self.image_size)
        pixels = torch.from_numpy(np.ascontiguousarray(array))
        pixels = pixels.unsqueeze(0) if pixels.ndim == 2 else pixels.permute(2, 0, 1)
        return _sample_item(to_signed_unit(pixels), int(self.labels[current]))


# --------------------------------------------------------------------------------------------
# Synthetic
# --------------------------------------------------------------------------------------------


class SyntheticImages(Dataset):
    """Deterministic smooth random images for fast tests; no files needed.

    Item ``i`` depends only on ``(seed, split, i)``: label ``i % num_classes``, image = a smooth
    pattern of its class (depends on ``seed`` only, so splits share classes) plus a smooth
    per-item perturbation (both bilinear upsamplings of 4x4 Gaussian grids), squashed by
    ``tanh`` into ``(-1, 1)``. Shapes: image ``(channels, image_size, image_size)`` float32,
    label int64 scalar.
    """

    GRID = 4

    def __init__(
        self,
        num_samples: int = 256,
        channels: int = 1,
        image_size: int = 32,
        num_classes: int = 10,
        seed: int = 0,
        split: str = "train",
    ) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"synthetic split must be 'train' or 'val', got {split!r}")
        for name, value in (
            ("synthetic_size", num_samples),
            ("image_size", image_size),
            ("num_classes", num_classes),
        ):
            if value < 1:
                raise ValueError(f"`data.init_args.{name}` must be >= 1, got {value}")
        if channels not in (1, 3):
            raise ValueError(f"`data.init_args.channels` must be 1 or 3, got {channels}")
        self.num_samples = num_samples
        self.channels = channels
        self.image_size = image_size
        self.num_classes = num_classes
        self.seed = seed
        self.split = split
        self._item_seed = seed * 1_000_003 + (0 if split == "train" else 500_000_017)
        generator = torch.Generator().manual_seed(seed)
        grids = 1.5 * torch.randn(num_classes, channels, self.GRID, self.GRID, generator=generator)
        self._class_patterns = self._upsample(grids)  # (num_classes, C, S, S)

    def _upsample(self, grid: torch.Tensor) -> torch.Tensor:
        size = (self.image_size, self.image_size)
        return F.interpolate(grid, size=size, mode="bilinear", align_corners=True)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        generator = torch.Generator().manual_seed(self._item_seed + int(index) + 1)
        grid = 0.5 * torch.randn(1, self.channels, self.GRID, self.GRID, generator=generator)
        label = int(index) % self.num_classes
        image = torch.tanh(self._class_patterns[label] + self._upsample(grid)[0])
        return _sample_item(image, label)


# --------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------

DATASET_NAMES: Sequence[str] = ("fashion_mnist", "image_folder", "synthetic")


def build_image_dataset(name: str, split: str, **kwargs: Any) -> Dataset:
    """Build a data set by name with a generic split.

    ``split`` is ``"train"`` or ``"val"``: Fashion-MNIST's val is its test split, an image
    folder's val is ``root/val``, synthetic val draws other items of the same classes. Keyword
    arguments go to the class (`FashionMNIST`, `ImageFolderDataset`, `SyntheticImages`).
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if name == "fashion_mnist":
        return FashionMNIST(split="train" if split == "train" else "test", **kwargs)
    if name == "image_folder":
        return ImageFolderDataset(split=split, **kwargs)
    if name == "synthetic":
        return SyntheticImages(split=split, **kwargs)
    raise ValueError(f"`data.init_args.dataset` must be one of {list(DATASET_NAMES)}, got {name!r}")
